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
	"regexp"
	"slices"
	"strconv"
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
	caddy.RegisterModule(Webhook{})
	httpcaddyfile.RegisterHandlerDirective("fortnox_webhook", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		wh := new(Webhook)
		return wh, wh.UnmarshalCaddyfile(h.Dispenser)
	})
	httpcaddyfile.RegisterDirectiveOrder("fortnox_webhook", httpcaddyfile.Before, "respond")
}

const (
	// maxWebhookBody bounds a consent event.
	maxWebhookBody = 64 << 10
	// maxSignatureHeaders bounds the signature headers one event may
	// carry: one per secret while a secret is rotated, not a thousand
	// guesses checked at our cost.
	maxSignatureHeaders = 4
	// defaultMaxAge is how old (or how far ahead) an event's signed
	// timestamp may be when timestamp_field is set and max_age is not.
	defaultMaxAge = 5 * time.Minute
)

// Webhook is the `fortnox_webhook` handler: it receives Fortnox's consent
// events ("consent created", "consent revoked" for service accounts).
// Fortnox's payload and signing are not documented to us, so the event
// names, the field holding the tenant id and the signature header are
// settings; the signature is an HMAC-SHA256 of the raw body, compared in
// constant time before the body is read as JSON. With timestamp_field, an
// event must carry its time inside the signed body: too old or too far
// ahead is refused, and per tenant only an event newer than the last one
// applied changes anything (replay protection).
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
	// The JSON field of the signed body that holds when the event
	// happened: RFC 3339, or Unix seconds as a number or a numeric string.
	// Setting it turns replay protection on: an event without it, older
	// than max_age or more than max_age ahead is refused, and an event
	// not newer than the last one applied for its tenant changes nothing.
	// A header cannot serve: it is not covered by the signature. Default:
	// none (no replay protection).
	TimestampField string `json:"timestamp_field,omitempty"`
	// How old, or how far ahead of this clock, an event's timestamp may
	// be. Only with timestamp_field. Default: 5m.
	MaxAge caddy.Duration `json:"max_age,omitempty"`

	secret  []byte
	poolKey string
	tokens  *tokens.Manager
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
	if err := wh.provisionReplayProtection(); err != nil {
		return err
	}
	wh.tokens, wh.poolKey, err = joinConfiguredManager(repl, wh.TokenURL, clientID)
	return err
}

// provisionReplayProtection checks timestamp_field and max_age and sets
// max_age's default.
func (wh *Webhook) provisionReplayProtection() error {
	if wh.MaxAge < 0 {
		return fmt.Errorf("max_age must be positive, not %s", time.Duration(wh.MaxAge))
	}
	if wh.TimestampField == "" {
		if wh.MaxAge != 0 {
			return errors.New("max_age needs timestamp_field: the age is read from a timestamp inside the signed body (a header is not signed, so it cannot serve)")
		}
		return nil
	}
	if wh.TimestampField == wh.EventField || wh.TimestampField == wh.TenantField {
		return fmt.Errorf("timestamp_field %q is also event_field or tenant_field: name the field that holds the event's time", wh.TimestampField)
	}
	if wh.MaxAge == 0 {
		wh.MaxAge = caddy.Duration(defaultMaxAge)
	}
	return nil
}

// Cleanup releases the token manager.
func (wh *Webhook) Cleanup() error { return leaveManager(wh.poolKey) }

// ServeHTTP handles one consent event. It answers 204 when the event was
// applied, 202 when it was not one it knows, 401 for a bad signature, 400
// for a body it cannot read, too many signature headers or (with
// timestamp_field) a missing, too old or future timestamp, and 409 for an
// event not newer than the last one applied for its tenant; only a
// verified, readable, fresh event changes state.
func (wh *Webhook) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeJSONError(w, http.StatusMethodNotAllowed, "method_not_allowed", "Consent events are POSTed.", 0)
		return nil
	}
	signatures := r.Header.Values(wh.SignatureHeader)
	if len(signatures) > maxSignatureHeaders {
		tokens.CountRefusal("too_many_signatures")
		wh.tokens.RefusalLog.Write(wh.logger, zapcore.WarnLevel, "too_many_signatures", "consent event with too many signature headers refused unchecked",
			zap.Int("headers", len(signatures)), zap.String("remote", r.RemoteAddr))
		writeJSONError(w, http.StatusBadRequest, "too_many_signatures", fmt.Sprintf(
			"The event carries %d %s headers; at most %d are checked (one per secret while a secret is rotated). Send one signature per secret.",
			len(signatures), wh.SignatureHeader, maxSignatureHeaders), 0)
		return nil
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxWebhookBody+1))
	if err != nil || len(body) > maxWebhookBody {
		writeJSONError(w, http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("The event is unreadable or larger than %d bytes.", maxWebhookBody), 0)
		return nil
	}
	if !wh.anyValidSignature(signatures, body) {
		tokens.CountRefusal("bad_signature")
		wh.tokens.RefusalLog.Write(wh.logger, zapcore.WarnLevel, "bad_signature", "consent event with a missing or bad signature refused", zap.String("remote", r.RemoteAddr))
		writeJSONError(w, http.StatusUnauthorized, "bad_signature", "The "+wh.SignatureHeader+" header is missing or does not match the body.", 0)
		return nil
	}
	ev, err := wh.parse(body)
	if err != nil {
		writeJSONError(w, http.StatusBadRequest, "bad_event", err.Error(), 0)
		return nil
	}
	var apply func(tenant string)
	switch {
	case slices.Contains(wh.CreatedEvents, ev.name):
		apply = wh.tokens.ConsentCreated
	case slices.Contains(wh.RevokedEvents, ev.name):
		apply = wh.tokens.ConsentRevoked
	default:
		wh.logger.Info("consent event ignored: not a configured event name", zap.String("event", tokens.CutDescription(ev.name)), zap.String("tenant", ev.tenant))
		w.WriteHeader(http.StatusAccepted)
		return nil
	}
	if wh.TimestampField != "" && !wh.fresh(w, r, ev) {
		return nil
	}
	apply(ev.tenant)
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// fresh applies replay protection to a verified event the webhook would
// apply: its signed timestamp must be within max_age of this clock, and
// newer than the last event applied for the tenant, which the shared state
// remembers (across the cluster in cluster mode). Otherwise it answers and
// returns false.
func (wh *Webhook) fresh(w http.ResponseWriter, r *http.Request, ev consentEvent) bool {
	at, err := eventTime(ev.fields[wh.TimestampField], wh.TimestampField)
	if err != nil {
		tokens.CountRefusal("bad_timestamp")
		wh.tokens.RefusalLog.Write(wh.logger, zapcore.WarnLevel, "bad_timestamp\x00"+ev.tenant, "consent event refused: no readable timestamp", zap.String("tenant", ev.tenant), zap.String("event", ev.name), zap.Error(err))
		writeJSONError(w, http.StatusBadRequest, "bad_timestamp", err.Error()+"; replay protection (timestamp_field) needs the event's time inside the signed body.", 0)
		return false
	}
	maxAge := time.Duration(wh.MaxAge)
	n := clk.Now()
	switch {
	case n.Sub(at) > maxAge:
		tokens.CountRefusal("event_too_old")
		wh.tokens.RefusalLog.Write(wh.logger, zapcore.WarnLevel, "event_too_old\x00"+ev.tenant, "consent event refused: too old", zap.String("tenant", ev.tenant), zap.String("event", ev.name), zap.Time("event_time", at))
		writeJSONError(w, http.StatusBadRequest, "event_too_old", fmt.Sprintf(
			"The event's %s (%s) is %s old, more than max_age (%s): a replay, or a delivery late beyond max_age. Nothing changed.",
			wh.TimestampField, at.UTC().Format(time.RFC3339), n.Sub(at).Round(time.Second), maxAge), 0)
		return false
	case at.Sub(n) > maxAge:
		tokens.CountRefusal("event_in_future")
		wh.tokens.RefusalLog.Write(wh.logger, zapcore.WarnLevel, "event_in_future\x00"+ev.tenant, "consent event refused: timestamp in the future", zap.String("tenant", ev.tenant), zap.String("event", ev.name), zap.Time("event_time", at))
		writeJSONError(w, http.StatusBadRequest, "event_in_future", fmt.Sprintf(
			"The event's %s (%s) is %s ahead of this clock (%s), more than max_age (%s): check the sender's and this host's clocks. Nothing changed.",
			wh.TimestampField, at.UTC().Format(time.RFC3339), at.Sub(n).Round(time.Second), n.UTC().Format(time.RFC3339), maxAge), 0)
		return false
	}
	newer, err := wh.tokens.Shared().NewerEvent(r.Context(), ev.tenant, at)
	if err != nil {
		wh.logger.Error("consent event not applied: its order cannot be checked", zap.String("tenant", ev.tenant), zap.String("event", ev.name), zap.Error(err))
		writeJSONError(w, http.StatusServiceUnavailable, "shared_state_unavailable",
			"The order of consent events cannot be checked right now ("+err.Error()+"). Nothing changed; send the event again.", 5*time.Second)
		return false
	}
	if !newer {
		tokens.CountRefusal("stale_event")
		wh.tokens.RefusalLog.Write(wh.logger, zapcore.InfoLevel, "stale_event\x00"+ev.tenant, "consent event ignored: not newer than the last one applied for the tenant", zap.String("tenant", ev.tenant), zap.String("event", ev.name), zap.Time("event_time", at))
		writeJSONError(w, http.StatusConflict, "stale_event", fmt.Sprintf(
			"An event for tenant %s at least as new as this one (%s) was applied already: a replay, a redelivery or an event overtaken by a newer one. Nothing changed.",
			ev.tenant, at.UTC().Format(time.RFC3339Nano)), 0)
		return false
	}
	return true
}

// unixSeconds is a Unix time in seconds, with an optional fraction.
var unixSeconds = regexp.MustCompile(`^([0-9]{1,19})(?:\.([0-9]{1,9}))?$`)

// eventTime reads an event's timestamp: an RFC 3339 string, or Unix
// seconds as a JSON number or a numeric string.
func eventTime(raw json.RawMessage, field string) (time.Time, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return time.Time{}, fmt.Errorf("the event has no %q", field)
	}
	text := string(raw)
	if raw[0] == '"' {
		if err := json.Unmarshal(raw, &text); err != nil {
			return time.Time{}, fmt.Errorf("the event's %q is not a readable string", field)
		}
		if t, err := time.Parse(time.RFC3339, text); err == nil {
			return t, nil
		}
	}
	m := unixSeconds.FindStringSubmatch(text)
	if m == nil {
		return time.Time{}, fmt.Errorf("the event's %q (%s) is neither RFC 3339 nor Unix seconds", field, tokens.CutDescription(text))
	}
	sec, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil || sec > 1e11 {
		return time.Time{}, fmt.Errorf("the event's %q (%s) is too large for Unix seconds (milliseconds?)", field, tokens.CutDescription(text))
	}
	nanos, _ := strconv.Atoi((m[2] + "000000000")[:9])
	return time.Unix(sec, int64(nanos)), nil
}

// anyValidSignature accepts the event when one of the signature headers
// matches (a sender may sign with an old and a new secret while rotating).
// The body's MAC is computed once, whatever the number of headers.
func (wh *Webhook) anyValidSignature(headers []string, body []byte) bool {
	if len(headers) == 0 {
		return false
	}
	mac := hmac.New(sha256.New, wh.secret)
	mac.Write(body)
	want := mac.Sum(nil)
	valid := false
	for _, h := range headers {
		// Every header is compared, so the time taken does not tell
		// which one matched.
		if got, ok := wh.decodeSignature(h); ok && hmac.Equal(got, want) {
			valid = true
		}
	}
	return valid
}

// decodeSignature reads one signature header (base64, padded or not, or
// hex; an optional "sha256=" prefix).
func (wh *Webhook) decodeSignature(header string) ([]byte, bool) {
	header = strings.TrimSpace(header)
	header = strings.TrimPrefix(header, "sha256=")
	if header == "" {
		return nil, false
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
	return got, err == nil
}

// consentEvent is a verified event: its name, its tenant, and its fields
// for the timestamp.
type consentEvent struct {
	name, tenant string
	fields       map[string]json.RawMessage
}

// parse reads the event name and the TenantId from a verified body.
func (wh *Webhook) parse(body []byte) (consentEvent, error) {
	var ev consentEvent
	if err := json.Unmarshal(body, &ev.fields); err != nil || ev.fields == nil {
		return ev, errors.New("the event is not a JSON object")
	}
	if err := json.Unmarshal(ev.fields[wh.EventField], &ev.name); err != nil || ev.name == "" {
		return ev, fmt.Errorf("the event has no %q string", wh.EventField)
	}
	ev.tenant = string(bytes.Trim(bytes.TrimSpace(ev.fields[wh.TenantField]), `"`))
	if !tokens.ValidTenantID(ev.tenant) {
		return ev, fmt.Errorf("the event's %q is not a TenantId", wh.TenantField)
	}
	return ev, nil
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
//		timestamp_field    <field>
//		max_age            <duration>
//	}
func (wh *Webhook) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	single := map[string]*string{
		"client_id":          &wh.ClientID,
		"token_url":          &wh.TokenURL,
		"secret":             &wh.Secret,
		"signature_header":   &wh.SignatureHeader,
		"signature_encoding": &wh.SignatureEncoding,
		"algorithm":          &wh.Algorithm,
		"event_field":        &wh.EventField,
		"tenant_field":       &wh.TenantField,
		"timestamp_field":    &wh.TimestampField,
	}
	lists := map[string]*[]string{
		"created_events": &wh.CreatedEvents,
		"revoked_events": &wh.RevokedEvents,
	}
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		switch {
		case option == "max_age":
			if err := durationArg(d, &wh.MaxAge); err != nil {
				return err
			}
		case single[option] != nil:
			if err := oneArg(d, single[option]); err != nil {
				return err
			}
		case lists[option] != nil:
			if *lists[option] = d.RemainingArgs(); len(*lists[option]) == 0 {
				return d.Errf("%s needs at least one value", option)
			}
		default:
			return d.Errf("unrecognized subdirective %q", option)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Webhook)(nil)
	_ caddy.CleanerUpper          = (*Webhook)(nil)
	_ caddyhttp.MiddlewareHandler = (*Webhook)(nil)
	_ caddyfile.Unmarshaler       = (*Webhook)(nil)
)
