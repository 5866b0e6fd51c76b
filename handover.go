package fortnox

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func init() {
	caddy.RegisterModule(Handover{})
	httpcaddyfile.RegisterHandlerDirective("fortnox_handover", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		ho := new(Handover)
		return ho, ho.UnmarshalCaddyfile(h.Dispenser)
	})
	httpcaddyfile.RegisterDirectiveOrder("fortnox_handover", httpcaddyfile.Before, "respond")
}

// Handover is the `fortnox_handover` handler: the app's one way to hand a
// refresh token over, on the proxy's own listener, so that the app never
// needs Caddy's admin endpoint. Mounted with handle_path, it serves exactly
//
//	PUT /tenants/{tenant}/refresh_token                  {"refresh_token":"…"}
//	PUT /tenants/{tenant}/accounts/{name}/refresh_token  {"refresh_token":"…"}
//
// with the rules and answers of the admin routes of the same paths (one
// implementation: serveHandOver): 204 when stored, 409 tenant_mismatch when
// the token is another tenant's (its rotated token goes to the quarantine),
// 400 for a bad tenant, account or body, 502/503 as for any token request.
// Other methods on those paths: 405; any other path: 404. No answer holds
// a token, a secret, the token URL or config. It acts on the state of the
// `fortnox` handler with the same client id and token URL, found at
// request time (in a config, this handler may be provisioned before it).
type Handover struct {
	// The client id of the fortnox handler to hand tokens to. Needed only
	// when more than one fortnox handler (client id) is loaded.
	// Placeholders are resolved at Provision.
	ClientID string `json:"client_id,omitempty"`
	// The token URL of that fortnox handler. Needed only when more than
	// one fortnox handler with the same client id is loaded. Placeholders
	// are resolved at Provision.
	TokenURL string `json:"token_url,omitempty"`

	clientID, tokenURL string
	logger             *zap.Logger
	// logs keeps what the app can make this handler log (a token endpoint
	// that fails, a config without its fortnox handler) to a line a
	// minute per cause.
	logs *tokens.LogLimiter
}

// CaddyModule returns the Caddy module information.
func (Handover) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.fortnox_handover",
		New: func() caddy.Module { return new(Handover) },
	}
}

// Provision resolves placeholders. The fortnox handler is found at request
// time, not here: it may be provisioned after this one.
func (ho *Handover) Provision(ctx caddy.Context) error {
	ho.logger = ctx.Logger()
	ho.logs = tokens.NewLogLimiter(clk)
	repl := caddy.NewReplacer()
	ho.clientID = strings.TrimSpace(repl.ReplaceAll(ho.ClientID, ""))
	if ho.ClientID != "" && ho.clientID == "" {
		return errors.New("client_id is empty after resolving placeholders")
	}
	if strings.TrimSpace(ho.TokenURL) != "" {
		ho.tokenURL = resolveTokenURL(repl, ho.TokenURL)
		if err := checkTokenURL(ho.tokenURL); err != nil {
			return err
		}
	}
	return nil
}

// ServeHTTP serves a hand-over. It never calls the next handler.
func (ho *Handover) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	err := ho.serve(w, r)
	if ae, ok := asAdminError(err); ok {
		ae = ho.forTheApp(ae)
		writeJSONError(w, ae.status, ae.code, ae.message, ae.retryAfter)
		return nil
	}
	if err != nil {
		// Not expected: answered without its text, which could name
		// something of the config.
		ho.logger.Error("hand-over failed", zap.Error(err))
		writeJSONError(w, http.StatusInternalServerError, "internal_error", "The hand-over failed; the sidecar's log says why.", 0)
	}
	return nil
}

func (ho *Handover) serve(w http.ResponseWriter, r *http.Request) error {
	route, ok := parseRoute(r.URL.Path)
	if !ok || route.name != "refresh_token" || !strings.HasPrefix(r.URL.Path, "/") {
		return apiError(http.StatusNotFound, "no_such_route", "no such route: hand a refresh token over with PUT /tenants/{tenant}/refresh_token or PUT /tenants/{tenant}/accounts/{name}/refresh_token below this mount point")
	}
	if err := checkRoute(w, r, route); err != nil {
		return err
	}
	m, err := ho.manager()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(r.Context(), tokens.LockBudget+time.Minute)
	defer cancel()
	return serveHandOver(ctx, w, r, m, tokens.Subject{Tenant: route.tenant, Account: route.account}, "through fortnox_handover")
}

// forTheApp is an admin answer as the app gets it: when the token endpoint
// failed, the admin message names the endpoint's host and what the
// operator can check; the app gets the same status and code, and a message
// without them (the log has the whole text).
func (ho *Handover) forTheApp(ae *adminError) *adminError {
	if ae.status != http.StatusBadGateway && ae.status != http.StatusServiceUnavailable {
		return ae
	}
	ho.logs.Write(ho.logger, zapcore.WarnLevel, ae.code, "hand-over not completed: the token endpoint failed", zap.String("error", ae.code), zap.String("cause", ae.message))
	out := *ae
	switch ae.status {
	case http.StatusServiceUnavailable:
		out.message = "Fortnox's token endpoint did not answer the refresh. If the request reached Fortnox, its answer was stored; otherwise the refresh token was not used. Retry with the same token after Retry-After; the sidecar's log has the cause."
	default:
		out.message = "Fortnox's token endpoint refused the sidecar or gave an answer that cannot be used; nothing was stored. The sidecar's log has the cause."
	}
	return &out
}

// manager finds the token manager of the fortnox handler with this
// handler's client id and token URL (any, when not set); exactly one must
// match. The answer names no client id or URL: the log does.
func (ho *Handover) manager() (*tokens.Manager, error) {
	var found []*tokens.Manager
	managers.Range(func(_, v any) bool {
		m := v.(*tokens.Manager)
		if (ho.clientID == "" || m.ClientID() == ho.clientID) && (ho.tokenURL == "" || m.TokenURL == ho.tokenURL) {
			found = append(found, m)
		}
		return true
	})
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		ho.logs.Write(ho.logger, zapcore.ErrorLevel, "no_handler", "fortnox_handover: no fortnox handler with its client_id and token_url is loaded: add one to the same config, or fix client_id/token_url",
			zap.String("client_id", ho.clientID))
		return nil, apiError(http.StatusInternalServerError, "no_handler", "No fortnox handler is loaded for this hand-over endpoint; nothing was stored and the token was not used. The sidecar's log says what to fix.")
	}
	ho.logs.Write(ho.logger, zapcore.ErrorLevel, "handler_ambiguous", "fortnox_handover: more than one fortnox handler matches: set client_id (and token_url) in the fortnox_handover block",
		zap.Int("handlers", len(found)))
	return nil, apiError(http.StatusInternalServerError, "handler_ambiguous", "More than one fortnox handler could take this hand-over; nothing was stored and the token was not used. The sidecar's log says what to fix.")
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	fortnox_handover {
//		client_id <id>     # only with more than one fortnox handler
//		token_url <url>    # only with more than one for the same client id
//	}
func (ho *Handover) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var field *string
		switch d.Val() {
		case "client_id":
			field = &ho.ClientID
		case "token_url":
			field = &ho.TokenURL
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
		if !d.NextArg() {
			return d.ArgErr()
		}
		*field = d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handover)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handover)(nil)
	_ caddyfile.Unmarshaler       = (*Handover)(nil)
)
