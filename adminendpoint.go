package fortnox

import (
	"fmt"
	"reflect"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"go.uber.org/zap"
)

// Caddy's admin endpoint can load any config, and a config can answer with
// {env.FORTNOX_CLIENT_SECRET} or send the tokens elsewhere: whoever reaches
// it holds every secret of the sidecar. On TCP it shares the pod's (or the
// host's) loopback with the app beside the sidecar, and with any SSRF bug
// in that app. So it belongs on a unix socket in a directory only the
// sidecar's user can open, as every shipped config has it, and a Caddyfile
// with a fortnox block that leaves it on TCP is warned about when it is
// adapted.

// adminOnTCPMessage is the warning's text: what the app could do, and how
// to move the endpoint.
const adminOnTCPMessage = "Caddy's admin endpoint listens on TCP (%s), which the app beside the sidecar shares: " +
	"the app, or an SSRF bug in it, could load a config through it that reads the client secret, the encryption key and the tokens, " +
	"or that sends requests and tokens elsewhere. Put it on a unix socket in a directory only the sidecar's user can open: " +
	"`admin unix//run/caddy-fortnox/admin.sock` in the global options (docs/deploy.md)"

// adminOnTCPState marks, in the adapter's state, that the warning was given.
const adminOnTCPState = "fortnox.admin_on_tcp_warned"

// warnIfAdminOnTCP adds one warning per adaptation when the global `admin`
// option leaves the admin endpoint on TCP: set to a TCP address, or not set
// (Caddy's default: CADDY_ADMIN, else TCP on localhost). Off, a unix socket or
// a socket handed over by file descriptor give none.
func warnIfAdminOnTCP(h httpcaddyfile.Helper) {
	listen, onTCP := adminListenOnTCP(h.Option("admin"))
	if !onTCP || h.State[adminOnTCPState] == true {
		return
	}
	h.State[adminOnTCPState] = true
	h.Reset() // to the directive's own line
	h.Next()
	w := caddyconfig.Warning{File: h.File(), Line: h.Line(), Directive: "fortnox", Message: fmtAdminOnTCP(listen)}
	warnings := adapterWarnings(&h)
	if warnings == nil {
		caddy.Log().Named("adapter").Warn(w.Message, zap.String("file", w.File), zap.Int("line", w.Line))
		return
	}
	for _, seen := range *warnings { // a named route is adapted with its own State
		if seen.Directive == w.Directive && seen.Message == w.Message {
			return
		}
	}
	*warnings = append(*warnings, w)
}

// adminListenOnTCP says where the admin endpoint listens, and whether that
// is on TCP, from the value of the global `admin` option.
func adminListenOnTCP(option any) (string, bool) {
	listen := caddy.DefaultAdminListen // the admin option not set
	if cfg, ok := option.(*caddy.AdminConfig); ok && cfg != nil {
		if cfg.Disabled {
			return "off", false
		}
		if cfg.Listen != "" {
			listen = cfg.Listen
		}
	}
	addr, err := caddy.ParseNetworkAddress(listen)
	if err != nil {
		return listen, false // Caddy refuses to start with it anyway
	}
	return listen, !addr.IsUnixNetwork() && !addr.IsFdNetwork()
}

func fmtAdminOnTCP(listen string) string {
	return fmt.Sprintf(adminOnTCPMessage, listen)
}

// adapterWarnings is the list the Caddyfile adapter returns its warnings
// in (and `caddy adapt` and `caddy run` print). Caddy gives a directive no
// exported way to add to it, so it is found by name in the Helper; nil if
// Caddy's Helper no longer has it (the warning is then logged instead, and
// TestAdminOnTCPWarning fails, to have this looked at).
func adapterWarnings(h *httpcaddyfile.Helper) *[]caddyconfig.Warning {
	f := reflect.ValueOf(h).Elem().FieldByName("warnings")
	if !f.IsValid() || f.Type() != reflect.TypeFor[*[]caddyconfig.Warning]() {
		return nil
	}
	return *(**[]caddyconfig.Warning)(unsafe.Pointer(f.UnsafeAddr()))
}
