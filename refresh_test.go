package fortnox

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// admin sends an admin API request and returns status and body.
func (s *sidecar) admin(method, path, body string) (int, string) {
	s.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, s.adminURL+path, rd)
	if err != nil {
		s.t.Fatal(err)
	}
	req.Close = true // the admin server restarts with each config load
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (s *sidecar) putRefreshToken(tenant, rt string) {
	s.t.Helper()
	if status, body := s.admin(http.MethodPut, "/fortnox/tenants/"+tenant+"/refresh_token", `{"refresh_token":"`+rt+`"}`); status != http.StatusNoContent {
		s.t.Fatalf("PUT refresh_token: %d %s", status, body)
	}
}

func (s *sidecar) recordPath(tenant string) string {
	return filepath.Join(s.dir, "storage", "fortnox", testClientID, tenant+".json")
}

// storedRecord reads the tenant's record straight from the storage folder.
func (s *sidecar) storedRecord(tenant string) *tokens.Record {
	s.t.Helper()
	return s.readRecordFile(s.recordPath(tenant))
}

// readRecordFile reads a plain record file.
func (s *sidecar) readRecordFile(path string) *tokens.Record {
	s.t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		s.t.Fatalf("reading the stored record: %v", err)
	}
	var rec tokens.Record
	if err := json.Unmarshal(raw, &rec); err != nil {
		s.t.Fatalf("stored record %s: %v", path, err)
	}
	return &rec
}

func (s *sidecar) tenants() []tokens.TenantInfo {
	s.t.Helper()
	status, body := s.admin(http.MethodGet, "/fortnox/tenants", "")
	if status != http.StatusOK {
		s.t.Fatalf("GET /fortnox/tenants: %d %s", status, body)
	}
	var out []tokens.TenantInfo
	if err := json.Unmarshal([]byte(body), &out); err != nil {
		s.t.Fatalf("GET /fortnox/tenants: %v: %s", err, body)
	}
	return out
}

func findTenant(infos []tokens.TenantInfo, tenant string) *tokens.TenantInfo {
	for i := range infos {
		if infos[i].Tenant == tenant {
			return &infos[i]
		}
	}
	return nil
}

// A tenant without a service-account consent works on its refresh token,
// and the new refresh token is in storage before Fortnox sees the access
// token that came with it.
func TestRefreshTokenTenantEndToEnd(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1, TokenLifetime: time.Minute})
	// Every request that reaches Fortnox is checked first: an access token
	// Fortnox has not seen before must already be in storage, with the
	// refresh token that came with it. (Older tokens still in use while a
	// background refresh runs are fine.)
	var mu sync.Mutex
	var orderErrors []string
	seen := map[string]bool{}
	var sc *sidecar
	upstream, _ := url.Parse(fake.URL())
	proxy := httputil.NewSingleHostReverseProxy(upstream)
	checker := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := sc.storedRecord("1234567")
		bearer := r.Header.Get("Authorization")
		mu.Lock()
		if !seen[bearer] {
			seen[bearer] = true
			if "Bearer "+rec.AccessToken != bearer {
				orderErrors = append(orderErrors, "a new access token reached Fortnox before it was stored")
			}
		}
		mu.Unlock()
		proxy.ServeHTTP(w, r)
	}))
	defer checker.Close()

	sc = startSidecar(t, fake, "refresh_before 20s")
	sc.upstream = checker.URL
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	rt := fake.IssueRefreshToken(testClientID, "1234567")
	sc.putRefreshToken("1234567", rt)

	for step := range 10 { // 10 × 10s: two and a half token lifetimes
		status, body, _ := sc.get("/3/companyinformation", "1234567")
		if status != http.StatusOK || companyNumber(t, body) != "1234567" {
			t.Fatalf("step %d: %d %s", step, status, body)
		}
		eventually(t, 5*time.Second, "background refresh", func() bool {
			v, ok := sc.manager().Cache.Get("1234567")
			return ok && !v.(*tokens.Token).Refreshing.Load()
		})
		if rt := sc.storedRecord("1234567").RefreshToken; !fake.RefreshTokenValid(rt) {
			t.Fatalf("step %d: the stored refresh token is not the live one", step)
		}
		advance(fake, 10*time.Second)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(orderErrors) > 0 {
		t.Errorf("%d ordering errors, first: %s", len(orderErrors), orderErrors[0])
	}
	if fake.RefreshTokenValid(rt) {
		t.Error("the imported refresh token was never used")
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant answers", n)
	}
	if n := fake.TokenRequests("refresh_token", "1234567"); n < 3 {
		t.Errorf("%d refreshes over 100s of 60s tokens, want at least 3", n)
	}
	info := findTenant(sc.tenants(), "1234567")
	if info == nil || info.Mode != "refresh_token" || !info.HasRefreshToken || info.TokenExpiresAt == nil || info.LastError != nil {
		t.Errorf("GET /fortnox/tenants row: %+v", info)
	}
}

// A rejected refresh token: 403 that says to authorize again, last_error,
// one ERROR log line, no retry loop; a new refresh token recovers.
func TestRejectedRefreshToken(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	// Someone else uses the stored refresh token first: ours is dead, and
	// the access token that came with it has expired.
	useRefreshToken(t, fake, sc.storedRecord("1234567").RefreshToken)
	advance(fake, time.Hour)

	for i := range 20 {
		status, body, resp := sc.get("/3/companyinformation", "1234567")
		if status != http.StatusForbidden {
			t.Fatalf("request %d: %d %s", i, status, body)
		}
		e := errorAnswer(t, resp, body)
		if e.Error != "refresh_token_rejected" || !strings.Contains(e.Message, "authorize") {
			t.Fatalf("answer %+v", e)
		}
		advance(fake, 30*time.Second) // past any backoff step
	}
	if n := fake.TokenRequests("refresh_token", ""); n != 3 { // the hand-over's, useRefreshToken's, and ours once
		t.Errorf("%d refresh requests, want ours to be tried once", n)
	}
	errorLines := 0
	for _, l := range sc.logLines("token request failed") {
		if l["level"] == "error" && l["tenant"] == "1234567" {
			errorLines++
		}
	}
	if errorLines != 1 {
		t.Errorf("%d ERROR lines for the rejected refresh token, want 1", errorLines)
	}
	info := findTenant(sc.tenants(), "1234567")
	if info == nil || info.LastError == nil || !strings.Contains(*info.LastError, "refresh_token_rejected") || info.HasRefreshToken {
		t.Errorf("GET /fortnox/tenants row: %+v", info)
	}

	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("after a new refresh token: %d %s", status, body)
	}
	if info := findTenant(sc.tenants(), "1234567"); info.LastError != nil || !info.HasRefreshToken {
		t.Errorf("after recovery: %+v", info)
	}
}

// useRefreshToken spends a refresh token at the fake, as another client would.
func useRefreshToken(t *testing.T, fake *fakefortnox.Server, rt string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, fake.TokenURL(), strings.NewReader(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}}.Encode()))
	req.SetBasicAuth(testClientID, testClientSecret)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("spending the refresh token: %d", resp.StatusCode)
	}
}

// A tenant on the refresh-token fallback moves to client credentials by
// itself once a service-account consent appears.
func TestRefreshTenantMovesToClientCredentials(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1, TokenLifetime: time.Hour})
	sc := startSidecar(t, fake, "retry_client_credentials 30m")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	fake.GrantConsent(testClientID, "1234567")
	for range 4 { // two hours: two token renewals after the consent
		advance(fake, 30*time.Minute)
		if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
			t.Fatalf("%d %s", status, body)
		}
		eventually(t, 5*time.Second, "background refresh", func() bool {
			v, ok := sc.manager().Cache.Get("1234567")
			return ok && !v.(*tokens.Token).Refreshing.Load()
		})
	}
	info := findTenant(sc.tenants(), "1234567")
	if info == nil || info.Mode != "client_credentials" {
		t.Fatalf("tenant row %+v, want mode client_credentials", info)
	}
	if !info.HasRefreshToken {
		t.Error("the refresh token was dropped; it must stay stored as the fallback")
	}
}

// With encryption_key, no stored file holds a token in plaintext; with the
// wrong key, the error is clear and the records stay byte-identical.
func TestEncryptedRecords(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	t.Setenv("FORTNOX_TEST_KEY", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
	sc := startSidecar(t, fake, "encryption_key {env.FORTNOX_TEST_KEY}")
	rt := fake.IssueRefreshToken(testClientID, "1234567")
	sc.putRefreshToken("1234567", rt)
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	before, err := os.ReadFile(sc.recordPath("1234567"))
	if err != nil {
		t.Fatal(err)
	}
	err = filepath.Walk(filepath.Join(sc.dir, "storage"), func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		b, _ := os.ReadFile(path)
		for _, p := range secretPatterns {
			if p.Match(b) {
				t.Errorf("%s holds a token in plaintext", path)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// Restart with another key: the record cannot be read, and is not touched.
	caddyStop(t)
	t.Setenv("FORTNOX_TEST_KEY", strings.Repeat("ab", 32))
	advance(fake, 2*time.Hour) // the cached token is gone either way
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	status, body, resp := sc.get("/3/companyinformation", "1234567")
	if status != http.StatusServiceUnavailable || errorAnswer(t, resp, body).Error != "token_storage_unavailable" {
		t.Fatalf("with the wrong key: %d %s", status, body)
	}
	if st, b := sc.admin(http.MethodPut, "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"0123456789abcdef"}`); st != http.StatusConflict || !strings.Contains(b, "encryption_key is not the key") {
		t.Errorf("PUT over an unreadable record: %d %s", st, b)
	}
	lines := sc.logLines("token request failed")
	if len(lines) == 0 || !strings.Contains(lines[len(lines)-1]["error"].(string), "encryption_key is not the key it was written with") {
		t.Errorf("the log does not say the key is wrong: %v", lines)
	}
	after, _ := os.ReadFile(sc.recordPath("1234567"))
	if !bytes.Equal(before, after) {
		t.Error("the record was changed under the wrong key")
	}
}

// Each admin route with bad input: a clear 4xx, nothing changed.
func TestAdminAPIBadInput(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "")
	sc.get("/3/companyinformation", "1234567")
	tests := []struct {
		method, path, body string
		want               int
		wantIn             string
	}{
		{"PUT", "/fortnox/tenants/12ab/refresh_token", `{"refresh_token":"x"}`, 400, "not a TenantId"},
		{"PUT", "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":`, 400, "must be JSON"},
		{"PUT", "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"  "}`, 400, "missing or empty"},
		{"PUT", "/fortnox/tenants/1234567/refresh_token", `{"token":"x"}`, 400, "must be JSON"},
		{"PUT", "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"a b"}`, 400, "not a refresh token"},
		{"PUT", "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"` + strings.Repeat("a", 70000) + `"}`, 413, "larger than"},
		{"POST", "/fortnox/refresh_tokens", `{"refresh_token":"0000000000000000000000000000000000000000"}`, 400, "rejected the refresh token"},
		{"POST", "/fortnox/refresh_tokens", `[]`, 400, "must be JSON"},
		{"DELETE", "/fortnox/tenants/7654321/token", "", 404, "not known"},
		{"GET", "/fortnox/tenants/1234567/token", "", 405, "use DELETE"},
		{"GET", "/fortnox/nothing", "", 404, "no such route"},
		{"GET", "/fortnox/tenants?client_id=other", "", 404, `no fortnox handler with client id`},
	}
	for _, tt := range tests {
		status, body := sc.admin(tt.method, tt.path, tt.body)
		if status != tt.want || !strings.Contains(body, tt.wantIn) {
			t.Errorf("%s %s: %d %s, want %d with %q", tt.method, tt.path, status, body, tt.want, tt.wantIn)
		}
	}
	if _, err := os.Stat(sc.recordPath("1234567")); err == nil {
		t.Error("a record was written by a refused request")
	}
	if infos := sc.tenants(); len(infos) != 1 || infos[0].Tenant != "1234567" || infos[0].Mode != "client_credentials" || infos[0].HasRefreshToken {
		t.Errorf("tenants after refused requests: %+v", infos)
	}
	// DELETE drops the token: the next request gets a new one.
	if status, body := sc.admin(http.MethodDelete, "/fortnox/tenants/1234567/token", ""); status != http.StatusNoContent {
		t.Fatalf("DELETE: %d %s", status, body)
	}
	sc.get("/3/companyinformation", "1234567")
	if n := fake.TokenRequests("", "1234567"); n != 2 {
		t.Errorf("%d token requests after DELETE, want 2", n)
	}
}

// POST /fortnox/refresh_tokens learns the tenant from the new access token.
func TestImportRefreshTokenOfUnknownTenant(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	rt := fake.IssueRefreshToken(testClientID, "5550001")
	status, body := sc.admin(http.MethodPost, "/fortnox/refresh_tokens", `{"refresh_token":"`+rt+`"}`)
	if status != http.StatusOK || strings.TrimSpace(body) != `{"tenant":"5550001"}` {
		t.Fatalf("POST: %d %s", status, body)
	}
	if strings.Contains(body, rt) {
		t.Error("the answer holds a token")
	}
	if status, body, _ := sc.get("/3/companyinformation", "5550001"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	if n := fake.TokenRequests("refresh_token", ""); n != 1 {
		t.Errorf("%d refreshes, want only the import's (its access token is used)", n)
	}
}

// With two client ids loaded, admin requests must say which.
func TestAdminAPIWithTwoClients(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1, Clients: map[string]string{testClientID: testClientSecret, "other-client": "other-secret"}})
	sc := startSidecar(t, fake, "")
	second := tokens.NewManager(fake.TokenURL(), "other-client", clk)
	managers.LoadOrStore(managerKey(fake.TokenURL(), "other-client"), second)
	defer managers.Delete(managerKey(fake.TokenURL(), "other-client"))
	status, body := sc.admin(http.MethodGet, "/fortnox/tenants", "")
	if status != http.StatusBadRequest || !strings.Contains(body, "client_id") {
		t.Errorf("without client_id: %d %s", status, body)
	}
	if status, body := sc.admin(http.MethodGet, "/fortnox/tenants?client_id="+testClientID, ""); status != http.StatusOK {
		t.Errorf("with client_id: %d %s", status, body)
	}
}

// caddyStop unloads the running config (the sidecar's cleanup tolerates it).
func caddyStop(t *testing.T) {
	t.Helper()
	if err := stopCaddy(); err != nil {
		t.Fatal(err)
	}
}

// A 4xx that is not invalid_grant (a proxy's 403) does not mark the
// refresh token dead: once the token endpoint behaves, the chain goes on.
func TestRefreshTokenSurvivesAnUnrelated4xx(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	advance(fake, time.Hour) // the access token from the hand-over has expired
	fake.SetFault(fakefortnox.Fault{Status: http.StatusForbidden})
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status == http.StatusOK {
		t.Fatalf("with the token endpoint refusing: %d %s", status, body)
	}
	fake.ClearFault()
	advance(fake, 2*time.Minute)
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("after the token endpoint recovered: %d %s", status, body)
	}
	if !sc.storedRecord("1234567").RejectedAt.IsZero() {
		t.Error("the refresh token was marked dead by a 403 without invalid_grant")
	}
}
