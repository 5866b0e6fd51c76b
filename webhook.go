package fortnox

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(Webhook{})
	httpcaddyfile.RegisterHandlerDirective("fortnox_webhook", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		wh := new(Webhook)
		return wh, wh.UnmarshalCaddyfile(h.Dispenser)
	})
	httpcaddyfile.RegisterDirectiveOrder("fortnox_webhook", httpcaddyfile.Before, "respond")
}

// maxWebhookBody bounds a consent event.
const maxWebhookBody = 64 << 10

// Webhook is the `fortnox_webhook` handler: it receives Fortnox's consent
// events ("consent created", "consent revoked" for service accounts).
// Fortnox's payload and signing are not documented to us, so the event
// names, the field holding the tenant id and the signature header are
// settings; the signature is an HMAC-SHA256 of the raw body, compared in
// constant time before the body is read as JSON.
type Webhook struct {
	// The integration's client id: events apply to this client's tenants.
	// Required.
	ClientID string `json:"client_id,omitempty"`
	// The token endpoint of the fortnox handler to act on. Default: Fortnox's.
	TokenURL string `json:"token_url,omitempty"`
	// The shared secret the signature is made with. Use a placeholder. Required.
	Secret string `json:"secret,omitempty"`
	// The header that holds the signature. Default: X-Signature.
	SignatureHeader string `json:"signature_header,omitempty"`
	// How the signature is written: base64 (default) or hex.
	SignatureEncoding string `json:"signature_encoding,omitempty"`
	// The signature algorithm. Only hmac-sha256 (the default) for now.
	Algorithm string `json:"algorithm,omitempty"`
	// The JSON field that names the event. Default: event.
	EventField string `json:"event_field,omitempty"`
	// The JSON field that holds the TenantId (a number or a string).
	// Default: tenant_id.
	TenantField string `json:"tenant_field,omitempty"`
	// Event names meaning "consent created". Default: client_credentials_consent.
	CreatedEvents []string `json:"created_events,omitempty"`
	// Event names meaning "consent revoked". Default: client_credentials_consent_revoked.
	RevokedEvents []string `json:"revoked_events,omitempty"`

	secret  []byte
	poolKey string
	tokens  *tokenManager
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Webhook) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.fortnox_webhook",
		New: func() caddy.Module { return new(Webhook) },
	}
}

// Provision checks the settings and joins the token manager of (token_url,
// client_id), shared with the fortnox handler.
func (wh *Webhook) Provision(ctx caddy.Context) error {
	wh.logger = ctx.Logger()
	repl := caddy.NewReplacer()
	clientID, err := resolveSetting(repl, "client_id", wh.ClientID)
	if err != nil {
		return err
	}
	secret, err := resolveSetting(repl, "secret", wh.Secret)
	if err != nil {
		return err
	}
	wh.secret = []byte(secret)
	if wh.SignatureHeader == "" {
		wh.SignatureHeader = "X-Signature"
	}
	if wh.SignatureEncoding == "" {
		wh.SignatureEncoding = "base64"
	}
	if wh.SignatureEncoding != "base64" && wh.SignatureEncoding != "hex" {
		return fmt.Errorf("signature_encoding must be base64 or hex, not %q", wh.SignatureEncoding)
	}
	if wh.Algorithm == "" {
		wh.Algorithm = "hmac-sha256"
	}
	if wh.Algorithm != "hmac-sha256" {
		return fmt.Errorf("algorithm %q is not supported (hmac-sha256 is)", wh.Algorithm)
	}
	if wh.EventField == "" {
		wh.EventField = "event"
	}
	if wh.TenantField == "" {
		wh.TenantField = "tenant_id"
	}
	if len(wh.CreatedEvents) == 0 {
		wh.CreatedEvents = []string{"client_credentials_consent"}
	}
	if len(wh.RevokedEvents) == 0 {
		wh.RevokedEvents = []string{"client_credentials_consent_revoked"}
	}
	wh.tokens, wh.poolKey, err = joinManager(resolveTokenURL(repl, wh.TokenURL), clientID)
	return err
}

// Cleanup releases the token manager.
func (wh *Webhook) Cleanup() error { return leaveManager(wh.poolKey) }

// ServeHTTP handles one consent event. It answers 204 when the event was
// applied, 202 when it was not one it knows, 401 for a bad signature, 400
// for a body it cannot read; only a verified, readable event changes state.
func (wh *Webhook) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeJSONError(w, http.StatusMethodNotAllowed, "method_not_allowed", "Consent events are POSTed.", 0)
		return nil
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxWebhookBody+1))
	if err != nil || len(body) > maxWebhookBody {
		writeJSONError(w, http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("The event is unreadable or larger than %d bytes.", maxWebhookBody), 0)
		return nil
	}
	if !wh.anyValidSignature(r.Header.Values(wh.SignatureHeader), body) {
		wh.logger.Warn("consent event with a missing or bad signature refused", zap.String("remote", r.RemoteAddr))
		writeJSONError(w, http.StatusUnauthorized, "bad_signature", "The "+wh.SignatureHeader+" header is missing or does not match the body.", 0)
		return nil
	}
	event, tenant, err := wh.parse(body)
	if err != nil {
		writeJSONError(w, http.StatusBadRequest, "bad_event", err.Error(), 0)
		return nil
	}
	switch {
	case slices.Contains(wh.CreatedEvents, event):
		wh.tokens.consentCreated(tenant)
	case slices.Contains(wh.RevokedEvents, event):
		wh.tokens.consentRevoked(tenant)
	default:
		wh.logger.Info("consent event ignored: not a configured event name", zap.String("event", cutDescription(event)), zap.String("tenant", tenant))
		w.WriteHeader(http.StatusAccepted)
		return nil
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// anyValidSignature accepts the event when one of the signature headers
// matches (a sender may sign with an old and a new secret while rotating).
func (wh *Webhook) anyValidSignature(headers []string, body []byte) bool {
	for _, h := range headers {
		if wh.validSignature(h, body) {
			return true
		}
	}
	return false
}

func (wh *Webhook) validSignature(header string, body []byte) bool {
	header = strings.TrimSpace(header)
	header = strings.TrimPrefix(header, "sha256=")
	if header == "" {
		return false
	}
	var got []byte
	var err error
	if wh.SignatureEncoding == "hex" {
		got, err = hex.DecodeString(header)
	} else {
		got, err = base64.StdEncoding.DecodeString(header)
		if err != nil {
			got, err = base64.RawStdEncoding.DecodeString(header)
		}
	}
	if err != nil {
		return false
	}
	mac := hmac.New(sha256.New, wh.secret)
	mac.Write(body)
	return hmac.Equal(got, mac.Sum(nil))
}

// parse reads the event name and the TenantId from a verified body.
func (wh *Webhook) parse(body []byte) (event, tenant string, err error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return "", "", errors.New("the event is not a JSON object")
	}
	if err := json.Unmarshal(fields[wh.EventField], &event); err != nil || event == "" {
		return "", "", fmt.Errorf("the event has no %q string", wh.EventField)
	}
	raw := string(bytes.Trim(bytes.TrimSpace(fields[wh.TenantField]), `"`))
	if !validTenantID(raw) {
		return "", "", fmt.Errorf("the event's %q is not a TenantId", wh.TenantField)
	}
	return event, raw, nil
}

// UnmarshalCaddyfile sets up the webhook from Caddyfile tokens. Syntax:
//
//	fortnox_webhook {
//		client_id          <id>
//		token_url          <url>
//		secret             <secret>
//		signature_header   <header>
//		signature_encoding base64|hex
//		algorithm          hmac-sha256
//		event_field        <field>
//		tenant_field       <field>
//		created_events     <name...>
//		revoked_events     <name...>
//	}
func (wh *Webhook) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	return unmarshalBlock(d, map[string]*string{
		"client_id":          &wh.ClientID,
		"token_url":          &wh.TokenURL,
		"secret":             &wh.Secret,
		"signature_header":   &wh.SignatureHeader,
		"signature_encoding": &wh.SignatureEncoding,
		"algorithm":          &wh.Algorithm,
		"event_field":        &wh.EventField,
		"tenant_field":       &wh.TenantField,
	}, map[string]*[]string{
		"created_events": &wh.CreatedEvents,
		"revoked_events": &wh.RevokedEvents,
	})
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Webhook)(nil)
	_ caddy.CleanerUpper          = (*Webhook)(nil)
	_ caddyhttp.MiddlewareHandler = (*Webhook)(nil)
	_ caddyfile.Unmarshaler       = (*Webhook)(nil)
)
