package fortnox

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"unsafe"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
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

func init() {
	httpcaddyfile.RegisterHandlerDirective("fortnox", parseCaddyfile)
	// So users need no `order` line: the token goes on before the proxy.
	httpcaddyfile.RegisterDirectiveOrder("fortnox", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	if err == nil {
		warnIfAdminOnTCP(h)
	}
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	fortnox {
//		client_id      <id>
//		client_secret  <secret>
//		token_url      <url>
//		tenant_header  <header>
//		tenant         [<alias>] <tenant_id>
//		only_listed_tenants
//		tenant_from_token
//		refresh_before <duration>
//		token_timeout  <duration>
//		retry_client_credentials <duration>
//		encryption_key <key> [<previous_key>...]
//		account_header <header>
//		redis          <url>
//		redis {
//			url          <url>                   # exactly one of url,
//			sentinel     <master> <host:port>... # sentinel
//			cluster      <host:port>...          # and cluster
//			username     <user>
//			password     <password>
//			tls
//			replica_acks <n>                     # default: the primary's replicas (0 or 1)
//		}
//		max_token_requests <n>
//		journal_dir    <directory>
//		rotation_timeout <duration>
//		rate_limit     <requests> <window> | off
//		max_wait       <duration>
//		replay_body_limit <size> | off
//		check_credentials on | off
//		notify {
//			url    <app URL>
//			secret <key>
//		}
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		switch option {
		case "client_id":
			if err := oneArg(d, &h.ClientID); err != nil {
				return err
			}
		case "client_secret":
			if err := oneArg(d, &h.ClientSecret); err != nil {
				return err
			}
		case "token_url":
			if err := oneArg(d, &h.TokenURL); err != nil {
				return err
			}
		case "tenant_header":
			if err := oneArg(d, &h.TenantHeader); err != nil {
				return err
			}
		case "tenant":
			args := d.RemainingArgs()
			var name, id string
			switch len(args) {
			case 1:
				name, id = args[0], args[0]
			case 2:
				name, id = args[0], args[1]
			default:
				return d.Errf("tenant takes a TenantId, or an alias and a TenantId: tenant [<alias>] <tenant_id>")
			}
			if h.Tenants == nil {
				h.Tenants = make(map[string]string)
			}
			if prev, dup := h.Tenants[name]; dup && prev != id {
				return d.Errf("tenant %q is declared twice, for %s and %s", name, prev, id)
			}
			h.Tenants[name] = id
			if err := tokens.ValidateTenantNames(map[string]string{name: id}); err != nil {
				return d.Err(err.Error())
			}
		case "only_listed_tenants":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.OnlyListedTenants = true
		case "tenant_from_token":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.TenantFromToken = true
		case "refresh_before":
			if err := durationArg(d, &h.RefreshBefore); err != nil {
				return err
			}
		case "token_timeout":
			if err := durationArg(d, &h.TokenTimeout); err != nil {
				return err
			}
		case "retry_client_credentials":
			if err := durationArg(d, &h.RetryClientCredentials); err != nil {
				return err
			}
		case "encryption_key":
			keys := d.RemainingArgs()
			if len(keys) == 0 {
				return d.Errf("encryption_key needs a value (and, while moving to a new key, the previous keys after it)")
			}
			h.EncryptionKey, h.PreviousEncryptionKeys = keys[0], keys[1:]
			if len(h.PreviousEncryptionKeys) == 0 {
				h.PreviousEncryptionKeys = nil
			}
		case "redis":
			if h.Redis != nil {
				return d.Errf("redis is given twice")
			}
			h.Redis = new(RedisConfig)
			if err := h.Redis.unmarshalCaddyfile(d); err != nil {
				return err
			}
		case "account_header":
			if err := oneArg(d, &h.AccountHeader); err != nil {
				return err
			}
		case "max_token_requests":
			var raw string
			if err := oneArg(d, &raw); err != nil {
				return err
			}
			n, err := strconv.Atoi(raw)
			if err != nil || n < 1 {
				return d.Errf("max_token_requests: %q is not a positive number", raw)
			}
			h.MaxTokenRequests = n
		case "journal_dir":
			if err := oneArg(d, &h.JournalDir); err != nil {
				return err
			}
			if strings.TrimSpace(h.JournalDir) == "" {
				return d.Errf("journal_dir must name a directory")
			}
		case "rotation_timeout":
			if err := durationArg(d, &h.RotationTimeout); err != nil {
				return err
			}
		case "rate_limit":
			rl, err := parseRateLimit(d)
			if err != nil {
				return err
			}
			h.RateLimit = rl
		case "max_wait":
			if err := durationArg(d, &h.MaxWait); err != nil {
				return err
			}
		case "replay_body_limit":
			var raw string
			if err := oneArg(d, &raw); err != nil {
				return err
			}
			if raw == "off" {
				h.ReplayBodyLimit = -1
				break
			}
			size, err := humanize.ParseBytes(raw)
			if err != nil || size == 0 || size > 1<<30 {
				return d.Errf("replay_body_limit: %q is not a size between 1 byte and 1GiB (e.g. 1MiB, 512KiB) or off", raw)
			}
			h.ReplayBodyLimit = int64(size)
		case "check_credentials":
			var raw string
			if err := oneArg(d, &raw); err != nil {
				return err
			}
			if raw != "on" && raw != "off" {
				return d.Errf("check_credentials: %q is neither on nor off", raw)
			}
			check := raw == "on"
			h.CheckCredentials = &check
		case "notify":
			n, err := parseNotify(d)
			if err != nil {
				return err
			}
			h.Notify = n
		default:
			return d.Errf("unrecognized subdirective %q", option)
		}
	}
	return nil
}

// unmarshalBlock parses a directive with no arguments and a block of
// options: those in single take exactly one value; those in lists take one
// or more. Anything else is an error naming the line.
func unmarshalBlock(d *caddyfile.Dispenser, single map[string]*string, lists map[string]*[]string) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if dst, ok := single[option]; ok {
			if err := oneArg(d, dst); err != nil {
				return err
			}
			continue
		}
		dst, ok := lists[option]
		if !ok {
			return d.Errf("unrecognized subdirective %q", option)
		}
		if *dst = d.RemainingArgs(); len(*dst) == 0 {
			return d.Errf("%s needs at least one value", option)
		}
	}
	return nil
}

// parseRateLimit reads `rate_limit <requests> <window>` or `rate_limit off`.
func parseRateLimit(d *caddyfile.Dispenser) (*RateLimit, error) {
	args := d.RemainingArgs()
	if len(args) == 1 && args[0] == "off" {
		return &RateLimit{Off: true}, nil
	}
	if len(args) != 2 {
		return nil, d.Errf("rate_limit takes a number of requests and a window (rate_limit 25 5s), or off")
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 1 {
		return nil, d.Errf("rate_limit: %q is not a positive number of requests", args[0])
	}
	window, err := caddy.ParseDuration(args[1])
	if err != nil || window <= 0 {
		return nil, d.Errf("rate_limit: %q is not a positive duration", args[1])
	}
	return &RateLimit{Requests: n, Window: caddy.Duration(window)}, nil
}

// oneArg reads exactly one argument into dst. Its error names the option,
// never the values, since the value may be a secret.
func oneArg(d *caddyfile.Dispenser, dst *string) error {
	option := d.Val()
	if !d.NextArg() {
		return d.Errf("%s needs a value", option)
	}
	*dst = d.Val()
	if d.NextArg() {
		return d.Errf("%s takes exactly one value", option)
	}
	return nil
}

// durationArg reads one positive duration (Caddy syntax: 90s, 5m, 1d).
func durationArg(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	option := d.Val()
	var raw string
	if err := oneArg(d, &raw); err != nil {
		return err
	}
	dur, err := caddy.ParseDuration(raw)
	if err != nil {
		return d.Errf("%s: %q is not a duration: %v", option, raw, err)
	}
	if dur <= 0 {
		return d.Errf("%s must be positive, got %s", option, raw)
	}
	*dst = caddy.Duration(dur)
	return nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)

// parseNotify reads `notify { url <url>; secret <key> }` inside the
// fortnox block.
func parseNotify(d *caddyfile.Dispenser) (*Notify, error) {
	if d.NextArg() {
		return nil, d.Errf("notify takes a block: notify { url <app URL>; secret <key> }")
	}
	n := new(Notify)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "url":
			if err := oneArg(d, &n.URL); err != nil {
				return nil, err
			}
		case "secret":
			if err := oneArg(d, &n.Secret); err != nil {
				return nil, err
			}
		default:
			return nil, d.Errf("unrecognized notify option %q (url, secret)", d.Val())
		}
	}
	return n, nil // both are checked at Provision, for JSON configs too
}
