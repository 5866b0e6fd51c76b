package fortnox

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

const testNotifySecret = "notify-secret-7d1e4b"

// receiver is the app's end of notify: a real HTTP server on 127.0.0.1
// that checks each event's signature and keeps what it got. It can answer
// 500, or be down (its port refuses), and come back on the same port.
type receiver struct {
	t    testing.TB
	addr string

	mu       sync.Mutex
	srv      *http.Server
	failWith int                   // 0: 204; otherwise this status
	attempts []tokens.Notification // every POST that was read, delivered or not
	got      []tokens.Notification // the ones answered 2xx
	bodies   map[string]string
}

func startReceiver(t testing.TB) *receiver {
	t.Helper()
	r := &receiver{t: t, bodies: map[string]string{}}
	r.up(0)
	t.Cleanup(r.down)
	return r
}

// up listens (again) on the receiver's address.
func (r *receiver) up(failWith int) {
	r.t.Helper()
	addr := r.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	var err error
	for range 50 { // the old socket may linger for a moment
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		r.t.Fatal(err)
	}
	r.mu.Lock()
	r.addr = ln.Addr().String()
	r.failWith = failWith
	r.srv = &http.Server{Handler: http.HandlerFunc(r.serve)}
	srv := r.srv
	r.mu.Unlock()
	go func() { _ = srv.Serve(ln) }()
}

// down closes the receiver: connections to its port are refused.
func (r *receiver) down() {
	r.mu.Lock()
	srv := r.srv
	r.srv = nil
	r.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
}

func (r *receiver) setFail(status int) {
	r.mu.Lock()
	r.failWith = status
	r.mu.Unlock()
}

func (r *receiver) url() string { return "http://" + r.addr + "/fortnox-events" }

// checkSignature is what the README's receiver does: HMAC-SHA256 of the
// exact body under the secret, lowercase hex, compared in constant time.
func checkSignature(secret string, body []byte, header string) bool {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	want := "sha256=" + hex.EncodeToString(mac.Sum(nil))
	return hmac.Equal([]byte(want), []byte(header))
}

func (r *receiver) serve(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	switch {
	case req.Method != http.MethodPost || req.URL.Path != "/fortnox-events":
		r.t.Errorf("receiver: %s %s", req.Method, req.URL.Path)
	case req.Header.Get("Content-Type") != "application/json":
		r.t.Errorf("receiver: Content-Type %q", req.Header.Get("Content-Type"))
	case !checkSignature(testNotifySecret, body, req.Header.Get("X-Fortnox-Signature")):
		r.t.Errorf("receiver: bad signature %q for %s", req.Header.Get("X-Fortnox-Signature"), body)
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	var fields map[string]any
	var n tokens.Notification
	if json.Unmarshal(body, &fields) != nil || json.Unmarshal(body, &n) != nil || len(fields) != 6 {
		r.t.Errorf("receiver: not the six fields: %s", body)
	}
	for _, k := range []string{"id", "event", "tenant", "account", "reason", "at"} {
		if _, ok := fields[k].(string); !ok {
			r.t.Errorf("receiver: %q is not a string in %s", k, body)
		}
	}
	if strings.Contains(string(body), "eyJ") || strings.Contains(string(body), testClientSecret) || strings.Contains(string(body), testNotifySecret) {
		r.t.Errorf("receiver: the event holds a token or secret: %s", body)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if prev, seen := r.bodies[n.ID]; seen && prev != string(body) {
		r.t.Errorf("receiver: event %s sent again with another body:\n%s\n%s", n.ID, prev, body)
	}
	r.bodies[n.ID] = string(body)
	r.attempts = append(r.attempts, n)
	if r.failWith != 0 {
		w.WriteHeader(r.failWith)
		return
	}
	r.got = append(r.got, n)
	w.WriteHeader(http.StatusNoContent)
}

func (r *receiver) delivered() []tokens.Notification {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]tokens.Notification(nil), r.got...)
}

func (r *receiver) tried() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.attempts)
}

// waitDelivered waits until n events were delivered and returns them.
func (r *receiver) waitDelivered(n int) []tokens.Notification {
	r.t.Helper()
	eventually(r.t, 15*time.Second, fmt.Sprintf("%d notifications delivered", n), func() bool { return len(r.delivered()) >= n })
	return r.delivered()
}

// waitTried waits until n attempts were made.
func (r *receiver) waitTried(n int) {
	r.t.Helper()
	eventually(r.t, 15*time.Second, fmt.Sprintf("%d delivery attempts", n), func() bool { return r.tried() >= n })
}

// waitFailed waits until the sidecar logged the n-th failed attempt (the
// event is back in the store, with its next time).
func waitFailed(t *testing.T, sc *sidecar, n int) {
	t.Helper()
	eventually(t, 15*time.Second, fmt.Sprintf("failed attempt %d", n), func() bool {
		for _, l := range sc.logLines("notification not delivered: it is tried again") {
			if l["attempts"] == float64(n) {
				return true
			}
		}
		return false
	})
}

// notifyOptions is the notify block for the receiver.
func notifyOptions(r *receiver) string {
	return "notify {\nurl " + r.url() + "\nsecret {env.FORTNOX_TEST_NOTIFY_SECRET}\n}"
}

// notifySidecar is a sidecar that notifies r, with a webhook site beside
// it; it returns the webhook's URL.
func notifySidecar(t *testing.T, fake *fakefortnox.Server, r *receiver, extra ...string) (*sidecar, string) {
	t.Helper()
	t.Setenv("FORTNOX_TEST_NOTIFY_SECRET", testNotifySecret)
	t.Setenv("FORTNOX_TEST_WEBHOOK_SECRET", testWebhookSecret)
	sc := startSidecar(t, fake, notifyOptions(r)+"\n"+strings.Join(extra, "\n"))
	t.Cleanup(func() { // the suite's log scan knows the client secret; this one the notify secret
		if b, err := os.ReadFile(sc.logPath()); err == nil && strings.Contains(string(b), testNotifySecret) {
			t.Errorf("the log holds the notify secret")
		}
	})
	port := freePort(t)
	sc.extraSites = webhookSite(port, fake, "")
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	return sc, fmt.Sprintf("http://127.0.0.1:%d/fortnox/webhook", port)
}

// checkEvent fails unless ev is the event, tenant, account and reason
// wanted, with an id and a recent time.
func checkEvent(t *testing.T, ev tokens.Notification, event, tenant, account, reason string) {
	t.Helper()
	if ev.Event != event || ev.Tenant != tenant || ev.Account != account || ev.Reason != reason {
		t.Errorf("event %+v, want %s for tenant %s account %q reason %s", ev, event, tenant, account, reason)
	}
	if !tokens.ValidNotificationID(ev.ID) {
		t.Errorf("id %q", ev.ID)
	}
	at, err := time.Parse(time.RFC3339, ev.At)
	if err != nil || clk.Now().Sub(at) > 15*time.Minute || at.Sub(clk.Now()) > time.Minute {
		t.Errorf("at %q (%v) is not RFC 3339 near the plugin's clock %s", ev.At, err, clk.Now().UTC())
	}
}

// revokeEvent and createEvent are consent events for tenant.
func revokeEvent(tenant string) string {
	return fmt.Sprintf(`{"event":%q,"tenant_id":%q}`, revokedEvent, tenant)
}

func createEvent(tenant string) string {
	return fmt.Sprintf(`{"event":%q,"tenant_id":%q}`, createdEvent, tenant)
}

func mustSignedEvent(t *testing.T, webhook, body string) {
	t.Helper()
	if status, e := signedEvent(t, webhook, body); status != http.StatusNoContent {
		t.Fatalf("webhook: %d %+v", status, e)
	}
}

// breakChain spends the tenant's stored refresh token elsewhere and
// requests until the sidecar finds it rejected (403).
func breakChain(t *testing.T, sc *sidecar, fake *fakefortnox.Server, tenant string) {
	t.Helper()
	useRefreshToken(t, fake, sc.storedRecord(tenant).RefreshToken)
	advance(fake, time.Hour)
	status, body, resp := sc.get("/3/companyinformation", tenant)
	if status != http.StatusForbidden || errorAnswer(t, resp, body).Error != "refresh_token_rejected" {
		t.Fatalf("after the chain broke: %d %s", status, body)
	}
}

// Each kind of event reaches the app over real HTTP, signed, with its
// fields: a rejected chain (service account and named account), a lost
// record, a revoked and a created consent, a quarantined hand-over.
func TestNotifyEachEvent(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	r := startReceiver(t)
	// The refresh-token tenants keep to their refresh token for the
	// whole test (the record lost below is found on that path).
	sc, webhook := notifySidecar(t, fake, r, "retry_client_credentials 3h")

	// A rejected chain of a tenant on its refresh token.
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	breakChain(t, sc, fake, "1234567")
	checkEvent(t, r.waitDelivered(1)[0], "reconnect_required", "1234567", "", "refresh_token_rejected")

	// A rejected chain of a named account.
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	useRefreshToken(t, fake, sc.storedAccountRecord("1234567", "anna").RefreshToken)
	advance(fake, time.Hour)
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/companyinformation", "1234567", "anna"); status != http.StatusForbidden {
		t.Fatalf("anna: %d %s", status, body)
	}
	checkEvent(t, r.waitDelivered(2)[1], "reconnect_required", "1234567", "anna", "refresh_token_rejected")

	// A lost record of a tenant on its refresh token.
	sc.putRefreshToken("2345678", fake.IssueRefreshToken(testClientID, "2345678"))
	if status, body, _ := sc.get("/3/companyinformation", "2345678"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	if err := os.Remove(sc.recordPath("2345678")); err != nil {
		t.Fatal(err)
	}
	advance(fake, time.Hour)
	if status, body, _ := sc.get("/3/companyinformation", "2345678"); status != http.StatusForbidden {
		t.Fatalf("after the record went: %d %s", status, body)
	}
	checkEvent(t, r.waitDelivered(3)[2], "reconnect_required", "2345678", "", "record_lost")

	// Consent revoked and created (fortnox_webhook).
	fake.GrantConsent(testClientID, "3456789")
	mustSignedEvent(t, webhook, revokeEvent("3456789"))
	checkEvent(t, r.waitDelivered(4)[3], "consent_revoked", "3456789", "", "webhook")
	mustSignedEvent(t, webhook, createEvent("3456789"))
	checkEvent(t, r.waitDelivered(5)[4], "consent_created", "3456789", "", "webhook")

	// A refresh token of 4567890 handed over for 5678901: quarantined
	// (4567890 has a live refresh token of its own, so it stays there).
	sc.putRefreshToken("4567890", fake.IssueRefreshToken(testClientID, "4567890"))
	status, body := sc.admin(http.MethodPut, "/fortnox/tenants/5678901/refresh_token", `{"refresh_token":"`+fake.IssueRefreshToken(testClientID, "4567890")+`"}`)
	if status != http.StatusConflict {
		t.Fatalf("hand-over for the wrong tenant: %d %s", status, body)
	}
	checkEvent(t, r.waitDelivered(6)[5], "quarantined", "5678901", "", "tenant_mismatch")

	ids := map[string]bool{}
	for _, ev := range r.delivered() {
		if ids[ev.ID] {
			t.Errorf("id %s twice", ev.ID)
		}
		ids[ev.ID] = true
	}
	eventually(t, 5*time.Second, "six 'notification delivered' log lines", func() bool { return len(sc.logLines("notification delivered")) == 6 })
}

// settle moves the clock past any retry and waits a little, so that an
// event made twice would have been delivered twice.
func settle(fake *fakefortnox.Server) {
	advance(fake, 10*time.Minute)
	time.Sleep(2500 * time.Millisecond)
}

// One event per change of state, not per failed request: a rejected
// chain that meets many requests is told once; a new refresh token that
// breaks again is told again; a revocation sent twice is told once.
func TestNotifyOncePerChangeOfState(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	r := startReceiver(t)
	sc, webhook := notifySidecar(t, fake, r)

	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	breakChain(t, sc, fake, "1234567")
	for i := range 100 {
		if i%10 == 0 {
			advance(fake, 2*time.Minute) // past the backoff: the token manager looks again
		}
		if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusForbidden {
			t.Fatalf("request %d: %d %s", i, status, body)
		}
	}
	first := r.waitDelivered(1)[0]
	settle(fake)
	if got := r.delivered(); len(got) != 1 {
		t.Fatalf("%d events for one rejected chain and 100 requests, want 1: %+v", len(got), got)
	}

	// A new refresh token, which breaks again: a new event.
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("after a new refresh token: %d %s", status, body)
	}
	breakChain(t, sc, fake, "1234567")
	second := r.waitDelivered(2)[1]
	checkEvent(t, second, "reconnect_required", "1234567", "", "refresh_token_rejected")
	if second.ID == first.ID {
		t.Error("the second break has the first one's id")
	}

	// A lost record meets many requests (the tenant tries client
	// credentials, then looks for its record): one event.
	sc.putRefreshToken("3456789", fake.IssueRefreshToken(testClientID, "3456789"))
	if status, body, _ := sc.get("/3/companyinformation", "3456789"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	if err := os.Remove(sc.recordPath("3456789")); err != nil {
		t.Fatal(err)
	}
	for i := range 30 {
		if i%10 == 0 {
			advance(fake, time.Hour)
		}
		if status, body, _ := sc.get("/3/companyinformation", "3456789"); status != http.StatusForbidden {
			t.Fatalf("request %d after the record went: %d %s", i, status, body)
		}
	}
	if ev := r.waitDelivered(3)[2]; ev.Event != "reconnect_required" || ev.Tenant != "3456789" || ev.Reason != "record_lost" {
		t.Errorf("event %+v", ev) // made at the first request of the three hours
	}
	settle(fake)
	if got := r.delivered(); len(got) != 3 {
		t.Fatalf("%d events, want 3: %+v", len(got), got)
	}

	// A revocation sent twice is one change of state; a new consent and
	// another revocation are two more.
	fake.GrantConsent(testClientID, "2345678")
	mustSignedEvent(t, webhook, revokeEvent("2345678"))
	mustSignedEvent(t, webhook, revokeEvent("2345678"))
	r.waitDelivered(4)
	settle(fake)
	if got := r.delivered(); len(got) != 4 {
		t.Fatalf("%d events after a revocation sent twice, want 4: %+v", len(got), got)
	}
	mustSignedEvent(t, webhook, createEvent("2345678"))
	mustSignedEvent(t, webhook, revokeEvent("2345678"))
	got := r.waitDelivered(6)
	settle(fake)
	if len(r.delivered()) != 6 || got[4].Event != "consent_created" || got[5].Event != "consent_revoked" {
		t.Errorf("events %+v", r.delivered())
	}
}

// A receiver that fails (500), then is down (refuses), then is up again
// gets the event: first retry after 5 s, then 10 s, 20 s, … on the
// plugin's clock, always the same body.
func TestNotifyRetriesUntilTheAppTakesIt(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	r := startReceiver(t)
	r.setFail(http.StatusInternalServerError)
	sc, webhook := notifySidecar(t, fake, r)
	fake.GrantConsent(testClientID, "1234567")
	mustSignedEvent(t, webhook, revokeEvent("1234567"))
	waitFailed(t, sc, 1)

	advance(fake, 5*time.Second) // the first retry
	waitFailed(t, sc, 2)
	advance(fake, 5*time.Second) // not yet: the second retry waits 10 s
	time.Sleep(2500 * time.Millisecond)
	if n := r.tried(); n != 2 {
		t.Fatalf("%d attempts 5 s after the first retry, want 2 (the next one is 10 s later)", n)
	}
	advance(fake, 5*time.Second)
	r.waitTried(3)

	waitFailed(t, sc, 3)
	r.down() // refused
	advance(fake, 20*time.Second)
	waitFailed(t, sc, 4)
	if len(r.delivered()) != 0 {
		t.Fatal("delivered while failing")
	}

	r.up(0)
	advance(fake, 40*time.Second)
	got := r.waitDelivered(1)
	checkEvent(t, got[0], "consent_revoked", "1234567", "", "webhook")
	settle(fake)
	if n := len(r.delivered()); n != 1 {
		t.Errorf("%d deliveries, want 1", n)
	}
	for _, a := range r.attempts {
		if a.ID != got[0].ID {
			t.Errorf("an attempt with another id: %+v", a)
		}
	}
	if n := len(sc.logLinesStarting("notification not delivered")); n != 4 {
		t.Errorf("%d failure log lines, want 4 (one WARN, then DEBUG)", n)
	}
}

// An event the app does not take within a day is dropped with one log
// line, and not tried again.
func TestNotifyGivesUpAfterADay(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	r := startReceiver(t)
	r.setFail(http.StatusServiceUnavailable)
	sc, webhook := notifySidecar(t, fake, r)
	fake.GrantConsent(testClientID, "1234567")
	mustSignedEvent(t, webhook, revokeEvent("1234567"))
	waitFailed(t, sc, 1)
	advance(fake, 25*time.Hour)
	r.waitTried(2)
	eventually(t, 10*time.Second, "the drop's log line", func() bool {
		return len(sc.logLines("notification dropped: the app did not take it within a day")) == 1
	})
	settle(fake)
	settle(fake)
	if n := r.tried(); n != 2 {
		t.Errorf("%d attempts after the drop, want 2", n)
	}
	if n := len(sc.logLines("notification dropped: the app did not take it within a day")); n != 1 {
		t.Errorf("%d drop lines", n)
	}
}

// A pending event survives a restart: Caddy stops with the receiver down
// and starts again on the same storage; the event is then delivered.
func TestNotifyPendingSurvivesARestart(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	r := startReceiver(t)
	r.down()
	sc, webhook := notifySidecar(t, fake, r)
	fake.GrantConsent(testClientID, "1234567")
	mustSignedEvent(t, webhook, revokeEvent("1234567"))
	pending := filepath.Join(sc.dir, "storage", "fortnox-notify", testClientID, "pending")
	waitFailed(t, sc, 1)
	if files, _ := os.ReadDir(pending); len(files) != 1 {
		t.Fatalf("%d pending files, want 1", len(files))
	}
	caddyStop(t)
	r.up(0)
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	advance(fake, 5*time.Second)
	checkEvent(t, r.waitDelivered(1)[0], "consent_revoked", "1234567", "", "webhook")
	eventually(t, 5*time.Second, "the pending file removed", func() bool {
		files, _ := os.ReadDir(pending)
		return len(files) == 0
	})
	settle(fake)
	if n := len(r.delivered()); n != 1 {
		t.Errorf("%d deliveries, want 1", n)
	}
}

// A notify block that would send events in the clear, or unsigned, is
// refused when the config loads; its secret is never echoed.
func TestNotifyRefusesBadConfig(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	t.Setenv("FORTNOX_TEST_NOTIFY_SECRET", testNotifySecret)
	t.Setenv("FORTNOX_TEST_EMPTY", "")
	sc := startSidecar(t, fake, "")
	for _, c := range []struct{ block, want string }{
		{"notify {\nurl http://app.example.com/events\nsecret {env.FORTNOX_TEST_NOTIFY_SECRET}\n}", "must be https"},
		{"notify {\nurl http://10.0.0.5/events\nsecret {env.FORTNOX_TEST_NOTIFY_SECRET}\n}", "must be https"},
		{"notify {\nurl https://app.example.com/events\n}", "notify secret is required"},
		{"notify {\nurl https://app.example.com/events\nsecret {env.FORTNOX_TEST_EMPTY}\n}", "notify secret is empty"},
		{"notify {\nsecret {env.FORTNOX_TEST_NOTIFY_SECRET}\n}", "notify url is required"},
		{"notify {\nurl ftp://app.example.com/\nsecret {env.FORTNOX_TEST_NOTIFY_SECRET}\n}", "not an http(s) URL"},
		{"notify {\nurl https://user:pw@app.example.com/\nsecret {env.FORTNOX_TEST_NOTIFY_SECRET}\n}", "must not contain credentials"},
	} {
		sc.options = c.block
		err := sc.load()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want an error with %q", c.block, err, c.want)
		}
		if err != nil && strings.Contains(err.Error(), testNotifySecret) {
			t.Errorf("the error shows the secret: %v", err)
		}
	}
	for _, ok := range []string{"https://app.example.com/events", "http://127.0.0.1:9/events", "http://localhost:9/", "http://[::1]:9/"} {
		sc.options = "notify {\nurl " + ok + "\nsecret {env.FORTNOX_TEST_NOTIFY_SECRET}\n}"
		if err := sc.load(); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

// The Caddyfile's notify block becomes the JSON twin, placeholders kept.
func TestNotifyCaddyfile(t *testing.T) {
	var h Handler
	d := caddyfile.NewTestDispenser(`fortnox {
		client_id x
		client_secret y
		notify {
			url {env.APP_EVENTS_URL}
			secret {env.FORTNOX_NOTIFY_SECRET}
		}
	}`)
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(h.Notify)
	if string(raw) != `{"url":"{env.APP_EVENTS_URL}","secret":"{env.FORTNOX_NOTIFY_SECRET}"}` {
		t.Errorf("JSON %s", raw)
	}
	for _, bad := range []string{"notify https://x", "notify {\nurl\n}", "notify {\nfoo bar\n}"} {
		if err := new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser("fortnox {\n" + bad + "\n}")); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// The schedule: 5 s, doubling, at most 5 min.
func TestNotifyRetrySchedule(t *testing.T) {
	want := []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second, 160 * time.Second, 5 * time.Minute, 5 * time.Minute}
	for i, w := range want {
		if got := tokens.NotifyRetryAfter(i + 1); got != w {
			t.Errorf("after %d failures: %v, want %v", i+1, got, w)
		}
	}
	if got := tokens.NotifyRetryAfter(1000); got != tokens.NotifyMaxRetry {
		t.Errorf("after 1000: %v", got)
	}
}
