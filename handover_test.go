package fortnox

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/redis/go-redis/v9"
)

// fortnox_handover, end to end: the app hands refresh tokens over on the
// proxy's own listener, with the admin routes' rules and answers, and
// reaches nothing else through it.

// handoverSite mounts fortnox_handover in the proxy's own site block.
const handoverSite = `
	handle_path /fortnox/handover/* {
		fortnox_handover
	}`

// handOver PUTs {"refresh_token":rt} to path below the hand-over mount,
// as the app would, and returns status, body and response.
func (s *sidecar) handOver(path, rt string) (int, []byte, *http.Response) {
	s.t.Helper()
	return s.do(http.MethodPut, "/fortnox/handover"+path, "", strings.NewReader(`{"refresh_token":"`+rt+`"}`), nil)
}

// leaksNothing fails when an answer of the hand-over endpoint holds a
// token, the secret, the token URL or a piece of config.
func leaksNothing(t *testing.T, fake *fakefortnox.Server, body []byte, tokens ...string) {
	t.Helper()
	text := string(body)
	for _, p := range secretPatterns {
		if p.MatchString(text) {
			t.Errorf("the answer holds a token or the secret: %s", text)
		}
	}
	for _, tok := range tokens {
		if tok != "" && strings.Contains(text, tok) {
			t.Errorf("the answer holds a token: %s", text)
		}
	}
	for _, what := range []string{fake.TokenURL(), strings.TrimPrefix(fake.URL(), "http://"), "/oauth-v1/token", testClientSecret, testClientID, "eyJ", `"apps"`, "encryption_key"} {
		if strings.Contains(text, what) {
			t.Errorf("the answer holds %q: %s", what, text)
		}
	}
	if regexpHex40.MatchString(text) {
		t.Errorf("the answer holds what looks like a refresh token: %s", text)
	}
}

// The hand-over is the sidecar's very first request: the service account's
// token and a named account's chain are stored (204) and serve requests.
func TestHandoverStoresTokens(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecarSite(t, fake, "", handoverSite)

	rt := fake.IssueRefreshToken(testClientID, "1234567")
	status, body, resp := sc.handOver("/tenants/1234567/refresh_token", rt)
	if status != http.StatusNoContent || len(body) != 0 {
		t.Fatalf("first request, hand-over of the service account's token: %d %s", status, body)
	}
	leaksNothing(t, fake, body, rt)
	if ct := resp.Header.Get("Content-Type"); ct != "" {
		t.Errorf("204 with Content-Type %q", ct)
	}
	rec := sc.storedRecord("1234567")
	if rec.Tenant != "1234567" || !fake.RefreshTokenValid(rec.RefreshToken) || rec.RefreshToken == rt {
		t.Fatalf("record: tenant %s, live %v, rotated %v", rec.Tenant, fake.RefreshTokenValid(rec.RefreshToken), rec.RefreshToken != rt)
	}
	if status, answer, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK || companyNumber(t, answer) != "1234567" {
		t.Errorf("tenant 1234567 after the hand-over: %d %s", status, answer)
	}

	anna := fake.IssueUserRefreshToken(testClientID, "1234567", annaUser)
	status, body, _ = sc.handOver("/tenants/1234567/accounts/anna/refresh_token", anna)
	if status != http.StatusNoContent {
		t.Fatalf("hand-over of anna's chain: %d %s", status, body)
	}
	if rec := sc.storedAccountRecord("1234567", "anna"); rec.UserID != annaUser || !fake.RefreshTokenValid(rec.RefreshToken) {
		t.Errorf("anna's record: user %q, live %v", rec.UserID, fake.RefreshTokenValid(rec.RefreshToken))
	}
	if status, answer, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "anna"); status != http.StatusOK || echoOf(t, answer).UserID != annaUser {
		t.Errorf("anna after the hand-over: %d %s", status, answer)
	}
	if lines := sc.logLines("refresh token stored through fortnox_handover"); len(lines) != 2 {
		t.Errorf("%d log lines for the two hand-overs, want 2", len(lines))
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
}

// Every answer of the hand-over endpoint other than 204: the admin routes'
// rules and codes, JSON, and nothing that is a token, a secret, the token
// URL or config. No path reaches anything but the two hand-over routes.
func TestHandoverRefusals(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecarSite(t, fake, "", handoverSite)

	// Another tenant's token: 409, quarantined, stored under no name.
	foreign := fake.IssueRefreshToken(testClientID, "7654321")
	status, body, resp := sc.handOver("/tenants/1234567/refresh_token", foreign)
	if e := errorAnswer(t, resp, body); status != http.StatusConflict || e.Error != "tenant_mismatch" ||
		!strings.Contains(e.Message, "7654321") || !strings.Contains(e.Message, "quarantine") {
		t.Fatalf("hand-over of 7654321's token for 1234567: %d %s", status, body)
	}
	leaksNothing(t, fake, body, foreign)
	for _, tenant := range []string{"1234567", "7654321"} {
		if _, err := os.Stat(sc.recordPath(tenant)); err == nil {
			t.Errorf("a record was written for %s", tenant)
		}
	}
	if q := sc.quarantine(); len(q) != 1 || q[0].Tenant == nil || *q[0].Tenant != "7654321" || q[0].SubmittedFor != "1234567" {
		t.Errorf("quarantine: %+v", q)
	}
	if n := fake.LiveRefreshTokens(testClientID, "7654321", ""); n != 1 {
		t.Errorf("%d live refresh tokens of the foreign service-account chain: lost", n)
	}
	// The same for a named account.
	foreignUser := fake.IssueUserRefreshToken(testClientID, "7654321", boUser)
	status, body, resp = sc.handOver("/tenants/1234567/accounts/bo/refresh_token", foreignUser)
	if e := errorAnswer(t, resp, body); status != http.StatusConflict || e.Error != "tenant_mismatch" {
		t.Fatalf("hand-over of 7654321's chain for account bo of 1234567: %d %s", status, body)
	}
	leaksNothing(t, fake, body, foreignUser)
	if _, err := os.Stat(sc.accountRecordPath("1234567", "bo")); err == nil {
		t.Error("another tenant's chain was stored under the account")
	}

	spent := fake.TokenRequests("refresh_token", "")
	good := fake.IssueRefreshToken(testClientID, "1234567")
	for _, c := range []struct {
		name, path, body string
		status           int
		code             string
	}{
		{"tenant not a TenantId", "/tenants/acme/refresh_token", `{"refresh_token":"` + good + `"}`, 400, "invalid_tenant"},
		{"tenant with a leading zero", "/tenants/01234567/refresh_token", `{"refresh_token":"` + good + `"}`, 400, "invalid_tenant"},
		{"tenant ...", "/tenants/.../refresh_token", `{"refresh_token":"` + good + `"}`, 400, "invalid_tenant"},
		{"account dots only", "/tenants/1234567/accounts/.../refresh_token", `{"refresh_token":"` + good + `"}`, 400, "invalid_account"},
		{"account too long", "/tenants/1234567/accounts/" + strings.Repeat("z", 65) + "/refresh_token", `{"refresh_token":"` + good + `"}`, 400, "invalid_account"},
		{"not JSON", "/tenants/1234567/refresh_token", good, 400, "bad_body"},
		{"no token", "/tenants/1234567/refresh_token", `{}`, 400, "bad_body"},
		{"empty token", "/tenants/1234567/refresh_token", `{"refresh_token":" "}`, 400, "bad_body"},
		{"unknown field", "/tenants/1234567/refresh_token", `{"refresh_token":"` + good + `","tenant":"1"}`, 400, "bad_body"},
		{"two objects", "/tenants/1234567/refresh_token", `{"refresh_token":"` + good + `"}{}`, 400, "bad_body"},
		{"token with a space", "/tenants/1234567/refresh_token", `{"refresh_token":"a b"}`, 400, "bad_refresh_token"},
		{"token too long", "/tenants/1234567/refresh_token", `{"refresh_token":"` + strings.Repeat("x", 2000) + `"}`, 400, "bad_refresh_token"},
		{"body too large", "/tenants/1234567/refresh_token", `{"refresh_token":"` + strings.Repeat("x", 70<<10) + `"}`, 413, "body_too_large"},
	} {
		status, body, resp := sc.do(http.MethodPut, "/fortnox/handover"+c.path, "", strings.NewReader(c.body), nil)
		if e := errorAnswer(t, resp, body); status != c.status || e.Error != c.code {
			t.Errorf("%s: %d %s, want %d %s", c.name, status, body, c.status, c.code)
		}
		leaksNothing(t, fake, body, good)
	}
	if n := fake.TokenRequests("refresh_token", "") - spent; n != 0 {
		t.Errorf("%d refresh tokens spent by refused hand-overs", n)
	}
	for _, method := range []string{http.MethodGet, http.MethodPost, http.MethodDelete, http.MethodPatch} {
		for _, path := range []string{"/tenants/1234567/refresh_token", "/tenants/1234567/accounts/anna/refresh_token"} {
			status, body, resp := sc.do(method, "/fortnox/handover"+path, "", strings.NewReader(`{"refresh_token":"`+good+`"}`), nil)
			if e := errorAnswer(t, resp, body); status != http.StatusMethodNotAllowed || e.Error != "method_not_allowed" || resp.Header.Get("Allow") != http.MethodPut {
				t.Errorf("%s %s: %d (Allow %q) %s", method, path, status, resp.Header.Get("Allow"), body)
			}
			leaksNothing(t, fake, body, good)
		}
	}

	// Nothing else is reachable below the mount point: not the admin API's
	// other routes, not Caddy's own admin paths.
	for _, c := range []struct{ method, path string }{
		{"GET", "/"},
		{"GET", "/tenants"},
		{"GET", "/fortnox/tenants"},
		{"GET", "/tenants/1234567"},
		{"PUT", "/fortnox/tenants/1234567/refresh_token"},
		{"DELETE", "/tenants/1234567/token"},
		{"DELETE", "/tenants/1234567/accounts/anna"},
		{"POST", "/refresh_tokens"},
		{"GET", "/quarantine"},
		{"POST", "/quarantine/20260101T000000-0123456789ab/release"},
		{"DELETE", "/quarantine/20260101T000000-0123456789ab"},
		{"POST", "/export"},
		{"POST", "/import"},
		{"GET", "/config/"},
		{"POST", "/load"},
		{"POST", "/adapt"},
		{"PUT", "/tenants/1234567/refresh_token/extra"},
		{"PUT", "/tenants/1234567/accounts/anna/refresh_token/x"},
		{"PUT", "/tenants/1234567/accounts/refresh_token"},
	} {
		status, body, resp := sc.do(c.method, "/fortnox/handover"+c.path, "", strings.NewReader(`{"refresh_token":"`+good+`"}`), nil)
		if e := errorAnswer(t, resp, body); status != http.StatusNotFound || e.Error != "no_such_route" {
			t.Errorf("%s %s: %d %s, want 404", c.method, c.path, status, body)
		}
		leaksNothing(t, fake, body, good)
	}
	// Paths that climb out of the mount point, sent exactly as written:
	// never config, never a token, never a 2xx.
	for _, path := range []string{
		"/fortnox/handover/../../config/",
		"/fortnox/handover/tenants/1234567/../../../config/",
		"/fortnox/handover/%2e%2e/%2e%2e/config/",
		"/fortnox/handover/tenants/1234567/refresh_token/../../../load",
		"/fortnox/handover/..%2f..%2fconfig/",
		"/fortnox/handover//config/",
	} {
		for _, method := range []string{"GET", "PUT", "POST"} {
			raw := fmt.Sprintf("%s %s HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\nContent-Length: 2\nConnection: close\n\n{}", method, path)
			status, body := sc.rawRequest(raw)
			if status < 400 {
				t.Errorf("%s %s: %d %s", method, path, status, body)
			}
			leaksNothing(t, fake, []byte(body), good)
		}
	}
	if n := fake.TokenRequests("refresh_token", "") - spent; n != 0 {
		t.Errorf("%d refresh tokens spent by refused requests", n)
	}
	if _, err := os.Stat(sc.recordPath("1234567")); err == nil {
		t.Error("a refused request stored a record")
	}

	// Fortnox rejects the token, or cannot be asked: the admin routes'
	// answers, still nothing of the token endpoint in them.
	used := fake.IssueRefreshToken(testClientID, "1234567")
	for _, f := range []struct {
		fault  *fakefortnox.Fault
		status int
		code   string
	}{
		{&fakefortnox.Fault{Status: http.StatusServiceUnavailable}, http.StatusServiceUnavailable, "token_endpoint_unavailable"},
		{&fakefortnox.Fault{Down: true}, http.StatusServiceUnavailable, "token_endpoint_unavailable"},
		{nil, http.StatusNoContent, ""},
		{nil, http.StatusBadRequest, "refresh_token_rejected"}, // the same token again: spent
	} {
		if f.fault != nil {
			fake.SetFault(*f.fault)
		}
		status, body, resp := sc.handOver("/tenants/1234567/refresh_token", used)
		fake.ClearFault()
		if f.code == "" {
			if status != f.status {
				t.Errorf("after the fault: %d %s", status, body)
			}
			continue
		}
		if e := errorAnswer(t, resp, body); status != f.status || e.Error != f.code {
			t.Errorf("fault %+v: %d %s, want %d %s", f.fault, status, body, f.status, f.code)
		}
		if f.status == http.StatusServiceUnavailable && resp.Header.Get("Retry-After") == "" {
			t.Errorf("fault %+v: 503 without Retry-After", f.fault)
		}
		leaksNothing(t, fake, body, used)
	}

	// The app cannot flood the log through the hand-over: a token endpoint
	// that keeps failing is logged once a minute, however many hand-overs
	// meet it.
	fake.SetFault(fakefortnox.Fault{Down: true})
	for i := 0; i < 20; i++ {
		if status, body, _ := sc.handOver("/tenants/1234567/refresh_token", used); status != http.StatusServiceUnavailable {
			t.Fatalf("hand-over %d with Fortnox down: %d %s", i, status, body)
		}
	}
	fake.ClearFault()
	if lines := sc.logLinesStarting("hand-over not completed"); len(lines) != 1 {
		t.Errorf("22 hand-overs that met a failing token endpoint wrote %d log lines, want 1 a minute", len(lines))
	}
}

// With two fortnox handlers (two client ids) loaded, fortnox_handover
// needs client_id (a placeholder works): without it, nothing is stored
// and the answer names no client id; with it, the token goes to that
// client's store.
func TestHandoverPicksItsClient(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1, Clients: map[string]string{testClientID: testClientSecret, "other-client": "other-secret-91c2"}})
	t.Setenv("FORTNOX_TEST_OTHER_SECRET", "other-secret-91c2")
	other := fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	fortnox {
		client_id other-client
		client_secret {env.FORTNOX_TEST_OTHER_SECRET}
		check_credentials off
		token_url %s
	}
	reverse_proxy %s
}
`, freePort(t), fake.TokenURL(), fake.URL())
	sc := startSidecarSite(t, fake, "", handoverSite)
	sc.extraSites = other
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	rt := fake.IssueRefreshToken(testClientID, "1234567")
	status, body, resp := sc.handOver("/tenants/1234567/refresh_token", rt)
	if e := errorAnswer(t, resp, body); status != http.StatusInternalServerError || e.Error != "handler_ambiguous" {
		t.Fatalf("two fortnox handlers, no client_id: %d %s", status, body)
	}
	leaksNothing(t, fake, body, rt)
	if strings.Contains(string(body), "other-client") {
		t.Errorf("the answer names a client id: %s", body)
	}
	if len(sc.logLinesStarting("fortnox_handover: more than one fortnox handler matches")) == 0 {
		t.Error("no log line says what to fix")
	}
	if n := fake.TokenRequests("refresh_token", ""); n != 0 {
		t.Errorf("%d refresh tokens spent", n)
	}

	sc.siteLines = `
	handle_path /fortnox/handover/* {
		fortnox_handover {
			client_id {env.FORTNOX_TEST_CLIENT_ID}
			token_url ` + fake.TokenURL() + `
		}
	}`
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	if status, body, _ := sc.handOver("/tenants/1234567/refresh_token", rt); status != http.StatusNoContent {
		t.Fatalf("with client_id: %d %s", status, body)
	}
	if rec := sc.storedRecord("1234567"); rec.ClientID != testClientID || !fake.RefreshTokenValid(rec.RefreshToken) {
		t.Errorf("record: client %q, live %v", rec.ClientID, fake.RefreshTokenValid(rec.RefreshToken))
	}

	sc.siteLines = `
	handle_path /fortnox/handover/* {
		fortnox_handover {
			client_id no-such-client
		}
	}`
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	rt = fake.IssueRefreshToken(testClientID, "1234567")
	status, body, resp = sc.handOver("/tenants/1234567/refresh_token", rt)
	if e := errorAnswer(t, resp, body); status != http.StatusInternalServerError || e.Error != "no_handler" || strings.Contains(e.Message, "no-such-client") {
		t.Errorf("client_id of no loaded handler: %d %s", status, body)
	}
}

// In cluster mode the hand-over (the sidecar's first request) lands in
// Redis, a mismatched one in the quarantine there, and any sidecar's
// admin API lists and releases it.
func TestHandoverInClusterMode(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	t.Setenv("FORTNOX_TEST_REDIS_URL", "redis://"+addr+"/0")
	t.Setenv("FORTNOX_TEST_KEY", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
	sc := startSidecarSite(t, fake, "redis {env.FORTNOX_TEST_REDIS_URL}\nencryption_key {env.FORTNOX_TEST_KEY}", handoverSite)
	client := redis.NewClient(&redis.Options{Addr: addr})
	t.Cleanup(func() { client.Close() })
	ctx := context.Background()
	exists := func(key string) bool { return client.Exists(ctx, redisstate.RecordKey(key)).Val() == 1 }

	rt := fake.IssueRefreshToken(testClientID, "1234567")
	if status, body, _ := sc.handOver("/tenants/1234567/refresh_token", rt); status != http.StatusNoContent {
		t.Fatalf("first request, hand-over: %d %s", status, body)
	}
	if key := tokens.RecordKey(testClientID, tokens.Subject{Tenant: "1234567"}); !exists(key) {
		t.Fatalf("the record %s is not in Redis", key)
	}
	if _, err := os.Stat(sc.recordPath("1234567")); err == nil {
		t.Error("the record was written to this sidecar's Caddy storage")
	}
	anna := fake.IssueUserRefreshToken(testClientID, "1234567", annaUser)
	if status, body, _ := sc.handOver("/tenants/1234567/accounts/anna/refresh_token", anna); status != http.StatusNoContent {
		t.Fatalf("hand-over of anna's chain: %d %s", status, body)
	}
	if key := tokens.RecordKey(testClientID, tokens.Subject{Tenant: "1234567", Account: "anna"}); !exists(key) {
		t.Fatalf("the record %s is not in Redis", key)
	}
	sc.manager().Cache.Flush()
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK || companyNumber(t, body) != "1234567" {
		t.Errorf("tenant 1234567: %d %s", status, body)
	}

	foreign := fake.IssueUserRefreshToken(testClientID, "7654321", boUser)
	status, body, resp := sc.handOver("/tenants/1234567/accounts/bo/refresh_token", foreign)
	if e := errorAnswer(t, resp, body); status != http.StatusConflict || e.Error != "tenant_mismatch" {
		t.Fatalf("another tenant's chain: %d %s", status, body)
	}
	leaksNothing(t, fake, body, foreign)
	q := findTenant(sc.tenants(), "7654321")
	if q == nil || len(q.Quarantined) != 1 || q.Quarantined[0].Account != "bo" || q.Quarantined[0].HandedOverFor != "1234567" {
		t.Fatalf("GET /fortnox/tenants, 7654321: %+v", q)
	}
	id := q.Quarantined[0].ID
	if !exists(tokens.QuarantineKey(testClientID, id)) {
		t.Fatalf("the quarantine record %s is not in Redis", id)
	}
	if entries, _ := os.ReadDir(sc.dir + "/storage/fortnox/" + testClientID + "/quarantine"); len(entries) != 0 {
		t.Errorf("the quarantine record was written to Caddy storage too: %v", entries)
	}
	status, out := sc.admin(http.MethodPost, "/fortnox/quarantine/"+id+"/release", "")
	if status != http.StatusOK || out != `{"account":"bo","tenant":"7654321"}`+"\n" {
		t.Fatalf("release: %d %s", status, out)
	}
	if exists(tokens.QuarantineKey(testClientID, id)) || !exists(tokens.RecordKey(testClientID, tokens.Subject{Tenant: "7654321", Account: "bo"})) {
		t.Error("the release did not move the token from the quarantine to its record in Redis")
	}
	sc.manager().Cache.Flush()
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "7654321", "bo"); status != http.StatusOK || echoOf(t, body).UserID != boUser {
		t.Errorf("bo of 7654321 after the release: %d %s", status, body)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
}

func TestHandoverCaddyfile(t *testing.T) {
	for _, c := range []struct {
		in       string
		want     Handover
		errorish string
	}{
		{in: `fortnox_handover`, want: Handover{}},
		{in: "fortnox_handover {\n client_id {env.X}\n token_url https://example.com/t\n}", want: Handover{ClientID: "{env.X}", TokenURL: "https://example.com/t"}},
		{in: `fortnox_handover extra`, errorish: "wrong argument count"},
		{in: "fortnox_handover {\n client_secret x\n}", errorish: `unrecognized subdirective "client_secret"`},
		{in: "fortnox_handover {\n client_id\n}", errorish: "wrong argument count"},
		{in: "fortnox_handover {\n client_id a b\n}", errorish: "wrong argument count"},
	} {
		var got Handover
		err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(c.in))
		switch {
		case c.errorish != "" && (err == nil || !strings.Contains(err.Error(), c.errorish)):
			t.Errorf("%q: error %v, want %q", c.in, err, c.errorish)
		case c.errorish == "" && (err != nil || got != c.want):
			t.Errorf("%q: %+v, %v", c.in, got, err)
		}
	}
}
