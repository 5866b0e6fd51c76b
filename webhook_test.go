package fortnox

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

const testWebhookSecret = "webhook-secret"

// webhookSite is a site block with fortnox_webhook (plus options) on
// /fortnox/webhook, as the docs show it.
func webhookSite(port int, fake *fakefortnox.Server, options string) string {
	return fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	handle /fortnox/webhook {
		fortnox_webhook {
			client_id {env.FORTNOX_TEST_CLIENT_ID}
			token_url %s
			secret {env.FORTNOX_TEST_WEBHOOK_SECRET}%s
		}
	}
	respond "not here" 404
}
`, port, fake.TokenURL(), strings.ReplaceAll(indentOptions(options), "\n", "\n\t"))
}

// webhookSidecar is a sidecar with a webhook site beside it; it returns
// the sidecar, the webhook's URL and a function that reloads the webhook
// with other options.
func webhookSidecar(t *testing.T, fake *fakefortnox.Server, options string) (*sidecar, string, func(options string)) {
	t.Helper()
	t.Setenv("FORTNOX_TEST_WEBHOOK_SECRET", testWebhookSecret)
	port := freePort(t)
	sc := startSidecar(t, fake, "")
	reload := func(options string) {
		t.Helper()
		sc.extraSites = webhookSite(port, fake, options)
		if err := sc.load(); err != nil {
			t.Fatal(err)
		}
	}
	reload(options)
	return sc, fmt.Sprintf("http://127.0.0.1:%d/fortnox/webhook", port), reload
}

// signBody is base64(HMAC-SHA256(body, secret)), the default signature.
func signBody(secret, body string) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(body))
	return base64.StdEncoding.EncodeToString(mac.Sum(nil))
}

// eventClient opens a connection per event: a config reload closes the
// old server's connections, which a kept-alive one would meet as EOF.
var eventClient = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// postEvent POSTs body with the given X-Signature headers and returns the
// status and, for an error answer, its error code and message.
func postEvent(t *testing.T, webhookURL, body string, signatures ...string) (int, errorBody) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, webhookURL, strings.NewReader(body))
	for _, s := range signatures {
		req.Header.Add("X-Signature", s)
	}
	resp, err := eventClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e errorBody
	if resp.StatusCode >= 300 {
		e = errorAnswer(t, resp, b)
	}
	return resp.StatusCode, e
}

// signedEvent POSTs body signed with the webhook's secret.
func signedEvent(t *testing.T, webhookURL, body string) (int, errorBody) {
	t.Helper()
	return postEvent(t, webhookURL, body, signBody(testWebhookSecret, body))
}

// stampedEvent is a consent event whose "timestamp" field holds stamp
// (raw JSON: a string or a number).
func stampedEvent(event, tenant, stamp string) string {
	return fmt.Sprintf(`{"event":%q,"tenant_id":%q,"timestamp":%s}`, event, tenant, stamp)
}

const (
	revokedEvent = "client_credentials_consent_revoked"
	createdEvent = "client_credentials_consent"
)

func rfc3339(t time.Time) string { return strconv.Quote(t.UTC().Format(time.RFC3339Nano)) }
func unixNumber(t time.Time) string {
	return strconv.FormatInt(t.Unix(), 10)
}

// served reports whether a request for tenant gets through (200) rather
// than being refused as revoked (403); anything else fails the test.
func served(t *testing.T, sc *sidecar, tenant string) bool {
	t.Helper()
	status, body, _ := sc.get("/3/companyinformation", tenant)
	switch status {
	case http.StatusOK:
		return true
	case http.StatusForbidden:
		return false
	}
	t.Fatalf("request for %s: %d %s", tenant, status, body)
	return false
}

// At most a few signature headers are checked: a thousand (one of them
// valid) are refused before any MAC is computed, and change nothing; the
// cap still leaves room for secret rotation.
func TestWebhookRefusesTooManySignatureHeaders(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, webhook, _ := webhookSidecar(t, fake, "")
	if !served(t, sc, "1234567") {
		t.Fatal("warm-up failed")
	}
	body := `{"event":"client_credentials_consent_revoked","tenant_id":1234567}`
	valid := signBody(testWebhookSecret, body)
	wrong := signBody("a-guess", body)

	// Short guesses: 1,000 of them fit in Caddy's default request-header
	// limit (16 KiB, plus Go's slack).
	thousand := make([]string, 1000)
	for i := range thousand {
		thousand[i] = "AAAA"
	}
	thousand[999] = valid
	refusedBefore := scrape(t, sc)[`caddy_fortnox_refusals_total{kind="too_many_signatures"}`]
	start := time.Now()
	status, e := postEvent(t, webhook, body, thousand...)
	t.Logf("1,000 signature headers refused in %v", time.Since(start))
	if status != http.StatusBadRequest || e.Error != "too_many_signatures" || !strings.Contains(e.Message, "1000 X-Signature headers") || !strings.Contains(e.Message, "at most 4") {
		t.Errorf("1,000 signature headers: %d %+v", status, e)
	}
	if status, e := postEvent(t, webhook, body, valid, wrong, wrong, wrong, wrong); status != http.StatusBadRequest || e.Error != "too_many_signatures" {
		t.Errorf("5 signature headers, the first valid: %d %+v", status, e)
	}
	if !served(t, sc, "1234567") {
		t.Fatal("a refused event revoked the tenant")
	}
	// One line a minute for the cause (a stranger cannot flood the log).
	if n := len(sc.logLines("consent event with too many signature headers refused unchecked")); n != 1 {
		t.Errorf("%d log lines for the two refused events, want 1", n)
	}
	if n := scrape(t, sc)[`caddy_fortnox_refusals_total{kind="too_many_signatures"}`] - refusedBefore; n != 2 {
		t.Errorf("caddy_fortnox_refusals_total{kind=\"too_many_signatures\"} grew by %v, want 2", n)
	}

	// Four headers (old and new secrets while rotating, and then some) are
	// checked, and the valid one is found wherever it is.
	if status, e := postEvent(t, webhook, body, wrong, wrong, wrong, valid); status != http.StatusNoContent {
		t.Fatalf("4 signature headers, the last valid: %d %+v", status, e)
	}
	if served(t, sc, "1234567") {
		t.Error("the verified revocation was not applied")
	}
}

// With timestamp_field, the newest event per tenant wins: an old signed
// "revoked" replayed after a newer "created" changes nothing, and neither
// does a redelivery; a newer event still applies, and each tenant has its
// own order.
func TestWebhookReplayOfAnOldEventChangesNothing(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.GrantConsent(testClientID, "7654321")
	sc, webhook, _ := webhookSidecar(t, fake, "timestamp_field timestamp")
	if !served(t, sc, "1234567") {
		t.Fatal("warm-up failed")
	}
	t0 := clk.Now()
	oldRevoked := stampedEvent(revokedEvent, "1234567", rfc3339(t0.Add(-2*time.Minute)))
	if status, e := signedEvent(t, webhook, oldRevoked); status != http.StatusNoContent {
		t.Fatalf("revoked: %d %+v", status, e)
	}
	if served(t, sc, "1234567") {
		t.Fatal("the revocation was not applied")
	}
	created := stampedEvent(createdEvent, "1234567", unixNumber(t0.Add(-time.Minute)))
	if status, e := signedEvent(t, webhook, created); status != http.StatusNoContent {
		t.Fatalf("created: %d %+v", status, e)
	}
	if !served(t, sc, "1234567") {
		t.Fatal("the new consent was not applied")
	}

	// The old revocation, replayed with its valid signature.
	status, e := signedEvent(t, webhook, oldRevoked)
	if status != http.StatusConflict || e.Error != "stale_event" || !strings.Contains(e.Message, "Nothing changed") {
		t.Errorf("replayed revocation: %d %+v", status, e)
	}
	if !served(t, sc, "1234567") {
		t.Fatal("a replayed old revocation revoked the tenant")
	}
	if status, e := signedEvent(t, webhook, created); status != http.StatusConflict || e.Error != "stale_event" {
		t.Errorf("redelivered created event: %d %+v", status, e)
	}

	// Events the webhook does not apply are not ordered, nor stamped.
	if status, _ := signedEvent(t, webhook, `{"event":"something_else","tenant_id":"1234567"}`); status != http.StatusAccepted {
		t.Errorf("unknown event without a timestamp: %d", status)
	}

	// A newer revocation (Unix seconds as a numeric string, with a fraction) applies.
	newer := stampedEvent(revokedEvent, "1234567", strconv.Quote(fmt.Sprintf("%d.25", t0.Unix())))
	if status, e := signedEvent(t, webhook, newer); status != http.StatusNoContent {
		t.Fatalf("newer revocation: %d %+v", status, e)
	}
	if served(t, sc, "1234567") {
		t.Error("the newer revocation was not applied")
	}

	// Another tenant's order is its own: an event older than 1234567's
	// last still applies to 7654321.
	if status, e := signedEvent(t, webhook, stampedEvent(revokedEvent, "7654321", rfc3339(t0.Add(-3*time.Minute)))); status != http.StatusNoContent {
		t.Errorf("another tenant's older event: %d %+v", status, e)
	}
	if served(t, sc, "7654321") {
		t.Error("the other tenant's revocation was not applied")
	}
}

// With timestamp_field, an event without a readable timestamp, too old
// (sent late, or delivered late: the clock moves) or too far ahead is
// refused and changes nothing, also not the tenant's order; max_age sets
// the bound.
func TestWebhookRefusesOldFutureAndUnstampedEvents(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.GrantConsent(testClientID, "7654321")
	sc, webhook, reload := webhookSidecar(t, fake, "timestamp_field timestamp")
	if !served(t, sc, "1234567") {
		t.Fatal("warm-up failed")
	}
	n := clk.Now()
	delivered := stampedEvent(revokedEvent, "1234567", unixNumber(n))
	advance(fake, 5*time.Minute+2*time.Second) // delivered 5m2s after it was sent
	n = clk.Now()
	for _, tc := range []struct {
		name, body, code, message string
	}{
		{"no timestamp", `{"event":"client_credentials_consent_revoked","tenant_id":1234567}`, "bad_timestamp", `the event has no "timestamp"`},
		{"null timestamp", stampedEvent(revokedEvent, "1234567", "null"), "bad_timestamp", `the event has no "timestamp"`},
		{"not a time", stampedEvent(revokedEvent, "1234567", `"yesterday"`), "bad_timestamp", "neither RFC 3339 nor Unix seconds"},
		{"a boolean", stampedEvent(revokedEvent, "1234567", `true`), "bad_timestamp", "neither RFC 3339 nor Unix seconds"},
		{"milliseconds", stampedEvent(revokedEvent, "1234567", strconv.FormatInt(n.UnixMilli(), 10)), "bad_timestamp", "milliseconds"},
		{"6 minutes old", stampedEvent(revokedEvent, "1234567", rfc3339(n.Add(-6*time.Minute))), "event_too_old", "more than max_age (5m0s)"},
		{"delivered late", delivered, "event_too_old", "s old, more than max_age (5m0s)"},
		{"6 minutes ahead", stampedEvent(revokedEvent, "1234567", rfc3339(n.Add(6*time.Minute))), "event_in_future", "ahead of this clock"},
	} {
		status, e := signedEvent(t, webhook, tc.body)
		if status != http.StatusBadRequest || e.Error != tc.code || !strings.Contains(e.Message, tc.message) {
			t.Errorf("%s: %d %+v, want 400 %s (%q)", tc.name, status, e, tc.code, tc.message)
		}
	}
	if !served(t, sc, "1234567") {
		t.Fatal("a refused event revoked the tenant")
	}
	// Within max_age, late or early, an event applies. Had a refused
	// event (6 minutes ahead) entered the tenant's order, this one would
	// be stale.
	if status, e := signedEvent(t, webhook, stampedEvent(revokedEvent, "1234567", rfc3339(clk.Now().Add(-4*time.Minute)))); status != http.StatusNoContent {
		t.Fatalf("a 4-minute-old event: %d %+v", status, e)
	}
	if served(t, sc, "1234567") {
		t.Error("the 4-minute-old revocation was not applied")
	}
	if status, e := signedEvent(t, webhook, stampedEvent(createdEvent, "1234567", rfc3339(clk.Now().Add(4*time.Minute)))); status != http.StatusNoContent {
		t.Fatalf("an event 4 minutes ahead: %d %+v", status, e)
	}

	// max_age 1m: two minutes is too old now.
	reload("timestamp_field timestamp\nmax_age 1m")
	status, e := signedEvent(t, webhook, stampedEvent(revokedEvent, "7654321", unixNumber(clk.Now().Add(-2*time.Minute))))
	if status != http.StatusBadRequest || e.Error != "event_too_old" || !strings.Contains(e.Message, "max_age (1m0s)") {
		t.Errorf("2 minutes old with max_age 1m: %d %+v", status, e)
	}
	if !served(t, sc, "7654321") {
		t.Fatal("a refused event revoked the tenant")
	}
	if status, e := signedEvent(t, webhook, stampedEvent(revokedEvent, "7654321", unixNumber(clk.Now().Add(-30*time.Second)))); status != http.StatusNoContent {
		t.Errorf("30 seconds old with max_age 1m: %d %+v", status, e)
	}
}

// The order of events is the shared state's (Redis in cluster mode): an
// event another sidecar applied makes older ones stale here, and what
// this webhook applies is remembered there.
func TestWebhookOrderIsTheSharedState(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, webhook, _ := webhookSidecar(t, fake, "timestamp_field timestamp")
	if !served(t, sc, "1234567") {
		t.Fatal("warm-up failed")
	}
	shared := sc.manager().Shared()
	ctx := context.Background()
	t0 := clk.Now().Add(-time.Minute).Truncate(time.Second)
	if newer, err := shared.NewerEvent(ctx, "1234567", t0); err != nil || !newer {
		t.Fatalf("seeding the order as another sidecar: %v %v", newer, err)
	}
	for _, at := range []time.Time{t0.Add(-time.Second), t0} {
		if status, e := signedEvent(t, webhook, stampedEvent(revokedEvent, "1234567", unixNumber(at))); status != http.StatusConflict || e.Error != "stale_event" {
			t.Errorf("revocation at %v, another sidecar applied %v: %d %+v", at, t0, status, e)
		}
	}
	if !served(t, sc, "1234567") {
		t.Fatal("a stale event revoked the tenant")
	}
	if status, e := signedEvent(t, webhook, stampedEvent(revokedEvent, "1234567", unixNumber(t0.Add(2*time.Second)))); status != http.StatusNoContent {
		t.Fatalf("a newer revocation: %d %+v", status, e)
	}
	if newer, err := shared.NewerEvent(ctx, "1234567", t0.Add(time.Second)); err != nil || newer {
		t.Errorf("the applied event is not in the shared order: an older one is still newer (%v %v)", newer, err)
	}
}

// Without timestamp_field there is no replay protection, as before: a
// timestamp in the body is not read, and events apply in the order they
// arrive, replays included.
func TestWebhookWithoutTimestampField(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, webhook, _ := webhookSidecar(t, fake, "")
	if !served(t, sc, "1234567") {
		t.Fatal("warm-up failed")
	}
	revoked := stampedEvent(revokedEvent, "1234567", rfc3339(clk.Now().Add(-24*time.Hour)))
	created := `{"event":"client_credentials_consent","tenant_id":1234567}`
	for i, step := range []struct {
		body   string
		served bool
	}{{revoked, false}, {created, true}, {revoked, false}} {
		if status, e := signedEvent(t, webhook, step.body); status != http.StatusNoContent {
			t.Fatalf("step %d: %d %+v", i, status, e)
		}
		if served(t, sc, "1234567") != step.served {
			t.Fatalf("step %d: served = %v, want %v", i, !step.served, step.served)
		}
	}
}

// timestamp_field and max_age in the Caddyfile, their JSON twins, and the
// config errors they can make.
func TestWebhookReplayOptions(t *testing.T) {
	var wh Webhook
	err := wh.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`fortnox_webhook {
		client_id id
		secret {env.W}
		timestamp_field created_at
		max_age 90s
	}`))
	if err != nil {
		t.Fatal(err)
	}
	if wh.TimestampField != "created_at" || time.Duration(wh.MaxAge) != 90*time.Second || wh.Secret != "{env.W}" {
		t.Errorf("parsed %+v", wh)
	}
	for _, bad := range []struct{ input, want string }{
		{"fortnox_webhook {\n max_age\n}", "max_age needs a value"},
		{"fortnox_webhook {\n max_age soon\n}", `max_age: "soon" is not a duration`},
		{"fortnox_webhook {\n max_age 0s\n}", "max_age must be positive"},
		{"fortnox_webhook {\n max_age 1m 2m\n}", "max_age takes exactly one value"},
		{"fortnox_webhook {\n timestamp_field a b\n}", "timestamp_field takes exactly one value"},
		{"fortnox_webhook {\n timestamp_header X-Time\n}", `unrecognized subdirective "timestamp_header"`},
		{"fortnox_webhook extra {\n}", "wrong argument count"},
	} {
		err := new(Webhook).UnmarshalCaddyfile(caddyfile.NewTestDispenser(bad.input))
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: %v, want %q", bad.input, err, bad.want)
		}
	}

	// The JSON twins, through the Caddyfile adapter.
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(`http://127.0.0.1:9 {
	fortnox_webhook {
		client_id id
		secret s
		timestamp_field created_at
		max_age 90s
	}
}`), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cfg), `"timestamp_field":"created_at"`) || !strings.Contains(string(cfg), `"max_age":90000000000`) {
		t.Errorf("adapted JSON lacks timestamp_field or max_age: %s", cfg)
	}
	var fromJSON Webhook
	if err := json.Unmarshal([]byte(`{"timestamp_field":"ts","max_age":"2m"}`), &fromJSON); err != nil || fromJSON.TimestampField != "ts" || time.Duration(fromJSON.MaxAge) != 2*time.Minute {
		t.Errorf("JSON: %+v %v", fromJSON, err)
	}

	// max_age defaults to 5m with timestamp_field, and is refused without
	// it, or negative (JSON can say so).
	defaulted := Webhook{TimestampField: "ts", EventField: "event", TenantField: "tenant_id"}
	if err := defaulted.provisionReplayProtection(); err != nil || time.Duration(defaulted.MaxAge) != 5*time.Minute {
		t.Errorf("default max_age: %v %v", time.Duration(defaulted.MaxAge), err)
	}
	negative := Webhook{TimestampField: "ts", EventField: "event", TenantField: "tenant_id", MaxAge: caddy.Duration(-time.Minute)}
	if err := negative.provisionReplayProtection(); err == nil || !strings.Contains(err.Error(), "max_age must be positive") {
		t.Errorf("negative max_age: %v", err)
	}
	if err := (&Webhook{EventField: "event", TenantField: "tenant_id"}).provisionReplayProtection(); err != nil {
		t.Errorf("no replay protection: %v", err)
	}

	fake := startFake(t, fakefortnox.Options{})
	for _, tc := range []struct{ options, want string }{
		{"max_age 5m", "max_age needs timestamp_field"},
		{"timestamp_field tenant_id", `timestamp_field "tenant_id" is also event_field or tenant_field`},
		{"event_field type\ntimestamp_field type", `timestamp_field "type" is also event_field or tenant_field`},
	} {
		sc := &sidecar{t: t, fake: fake, dir: t.TempDir()}
		sc.caddyfileTemplate = caddyfileTemplate{port: freePort(t), adminPort: freePort(t), tokenURL: fake.TokenURL(), upstream: fake.URL(),
			extraSites: webhookSite(freePort(t), fake, tc.options)}
		t.Setenv("FORTNOX_TEST_CLIENT_ID", testClientID)
		t.Setenv("FORTNOX_TEST_CLIENT_SECRET", testClientSecret)
		t.Setenv("FORTNOX_TEST_WEBHOOK_SECRET", testWebhookSecret)
		err := sc.load()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.options, err, tc.want)
		}
	}
}

// The timestamp formats the webhook reads, and what it refuses.
func TestEventTime(t *testing.T) {
	for _, tc := range []struct {
		raw  string
		want time.Time
		err  string
	}{
		{`"2024-05-01T10:00:00Z"`, time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC), ""},
		{`"2024-05-01T12:00:00.5+02:00"`, time.Date(2024, 5, 1, 10, 0, 0, 5e8, time.UTC), ""},
		{`1714557600`, time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC), ""},
		{`"1714557600"`, time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC), ""},
		{`1714557600.125`, time.Date(2024, 5, 1, 10, 0, 0, 125e6, time.UTC), ""},
		{``, time.Time{}, `has no "ts"`},
		{`null`, time.Time{}, `has no "ts"`},
		{`""`, time.Time{}, "neither RFC 3339 nor Unix seconds"},
		{`-5`, time.Time{}, "neither RFC 3339 nor Unix seconds"},
		{`1.7e9`, time.Time{}, "neither RFC 3339 nor Unix seconds"},
		{`"2024-05-01 10:00"`, time.Time{}, "neither RFC 3339 nor Unix seconds"},
		{`{"s":1}`, time.Time{}, "neither RFC 3339 nor Unix seconds"},
		{`1714557600000`, time.Time{}, "milliseconds"},
		{`99999999999999999999`, time.Time{}, "neither RFC 3339 nor Unix seconds"},
		{`9999999999999999999`, time.Time{}, "milliseconds"},
	} {
		got, err := eventTime(json.RawMessage(tc.raw), "ts")
		switch {
		case tc.err == "" && (err != nil || !got.Equal(tc.want)):
			t.Errorf("%s: %v %v, want %v", tc.raw, got, err, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: %v %v, want an error with %q", tc.raw, got, err, tc.err)
		}
	}
}
