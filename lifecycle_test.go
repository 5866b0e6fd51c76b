package fortnox

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// A refresh that has started always finishes and stores its result: no
// caller leaving, no token_timeout, no reload or shutdown cuts it short.
// The fake's AnswerDelay rotates the refresh token at once and answers
// later, which is when a cut-short request loses the only live token.

// POST /fortnox/refresh_tokens whose admin client leaves mid-exchange.
func TestImportSurvivesTheAdminClientLeaving(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	rt := fake.IssueRefreshToken(testClientID, "5550001")
	fake.SetFault(fakefortnox.Fault{AnswerDelay: 500 * time.Millisecond})
	impatient := &http.Client{Timeout: 100 * time.Millisecond}
	req, _ := http.NewRequest(http.MethodPost, sc.adminURL+"/fortnox/refresh_tokens", strings.NewReader(`{"refresh_token":"`+rt+`"}`))
	if resp, err := impatient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatal("the admin client did not leave; the test proves nothing")
	}
	eventually(t, 5*time.Second, "the new refresh token to be stored", func() bool {
		_, err := os.Stat(sc.recordPath("5550001"))
		return err == nil
	})
	if !fake.RefreshTokenValid(sc.storedRecord("5550001").RefreshToken) {
		t.Fatal("the stored refresh token is not the live one")
	}
	fake.ClearFault()
	if status, body, _ := sc.get("/3/companyinformation", "5550001"); status != http.StatusOK {
		t.Errorf("%d %s", status, body)
	}
}

// token_timeout no longer cancels a refresh that was sent.
func TestTokenTimeoutDoesNotCutARefresh(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "token_timeout 200ms\nretry_client_credentials 3h")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body) // the tenant is on its refresh token now
	}
	advance(fake, time.Hour) // the hand-over's access token has expired
	fake.SetFault(fakefortnox.Fault{AnswerDelay: 700 * time.Millisecond})
	status, body, _ := sc.get("/3/companyinformation", "1234567")
	if status != http.StatusOK {
		t.Logf("the request itself: %d %s", status, body)
	}
	fake.ClearFault()
	eventually(t, 5*time.Second, "a live stored refresh token", func() bool {
		return fake.RefreshTokenValid(sc.storedRecord("1234567").RefreshToken)
	})
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Errorf("afterwards: %d %s", status, body)
	}
	if n := fake.LiveRefreshTokens(testClientID, "1234567", ""); n != 1 {
		t.Errorf("%d live refresh tokens, want 1", n)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant: a refresh token was lost", n)
	}
}

// A shutdown while a background refresh is in flight waits for it (within
// a grace period) and stores its answer; the next process goes on with the
// chain.
func TestShutdownDuringARefreshKeepsTheNewToken(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "refresh_before 10m")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	advance(fake, 55*time.Minute) // due for refresh-ahead, still valid
	fake.SetFault(fakefortnox.Fault{AnswerDelay: time.Second})
	before := fake.TokenRequests("refresh_token", "")
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body) // served from the cache; the refresh runs behind it
	}
	eventually(t, 5*time.Second, "the background refresh to be sent", func() bool {
		return fake.TokenRequests("refresh_token", "") > before
	})
	caddyStop(t)
	if !fake.RefreshTokenValid(sc.storedRecord("1234567").RefreshToken) {
		t.Fatal("after the shutdown the store does not hold the live refresh token")
	}
	fake.ClearFault()
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	advance(fake, time.Hour)
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Errorf("after a restart: %d %s", status, body)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
}

// A refresh-token tenant whose record disappears gets 403 saying what to
// do, backs off, and is listed with its error (not 503 forever).
func TestRefreshTenantWhoseRecordDisappears(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	advance(fake, time.Hour)
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	if err := os.Remove(sc.recordPath("1234567")); err != nil {
		t.Fatal(err)
	}
	advance(fake, time.Hour)
	before := fake.TokenRequests("", "")
	for i := range 5 {
		status, body, resp := sc.get("/3/companyinformation", "1234567")
		if e := errorAnswer(t, resp, body); status != http.StatusForbidden || e.Error != "tenant_not_authorized" || !strings.Contains(e.Message, "refresh token") {
			t.Fatalf("request %d: %d %s", i, status, body)
		}
	}
	if n := fake.TokenRequests("", "") - before; n != 1 {
		t.Errorf("%d token requests for 5 requests, want 1 (then the backoff)", n)
	}
	info := findTenant(sc.tenants(), "1234567")
	if info == nil || info.LastError == nil || !strings.Contains(*info.LastError, "tenant_not_authorized") {
		t.Errorf("row: %+v", info)
	}
}

// A revoked consent is written into the tenant's record: after a restart
// the tenant is still refused, and its stored refresh token is not used.
func TestRevokedConsentSurvivesARestart(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc, public := connectSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	revoked := `{"event":"client_credentials_consent_revoked","tenant_id":1234567}`
	if got := sendEvent(t, public, revoked, "webhook-secret"); got != http.StatusNoContent {
		t.Fatalf("revoked event: %d", got)
	}
	caddyStop(t)
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	before := fake.TokenRequests("", "")
	status, body, resp := sc.get("/3/companyinformation", "1234567")
	if status != http.StatusForbidden || errorAnswer(t, resp, body).Error != "consent_revoked" {
		t.Fatalf("after a restart: %d %s", status, body)
	}
	if n := fake.TokenRequests("", "") - before; n != 0 {
		t.Errorf("%d token requests for a revoked tenant", n)
	}
	if info := findTenant(sc.tenants(), "1234567"); info == nil || !info.ConsentRevoked {
		t.Errorf("row: %+v", info)
	}
	created := `{"event":"client_credentials_consent","tenant_id":1234567}`
	if got := sendEvent(t, public, created, "webhook-secret"); got != http.StatusNoContent {
		t.Fatalf("created event: %d", got)
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Errorf("after a new consent: %d %s", status, body)
	}
}

// Admin input: trailing data, control characters and tokens longer than
// any Fortnox token are refused before anything is sent to Fortnox.
func TestAdminRefusesMalformedTokens(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	rt := fake.IssueRefreshToken(testClientID, "1234567")
	for name, body := range map[string]string{
		"trailing JSON":      `{"refresh_token":"` + rt + `"}{"refresh_token":"x"}`,
		"trailing garbage":   `{"refresh_token":"` + rt + `"} x`,
		"control character":  `{"refresh_token":"` + rt + `\u001b[2J"}`,
		"newline inside":     `{"refresh_token":"` + rt[:20] + `\n` + rt[20:] + `"}`,
		"non-ASCII":          `{"refresh_token":"` + rt + `é"}`,
		"far too long":       `{"refresh_token":"` + strings.Repeat("a", 5000) + `"}`,
		"unknown field":      `{"refresh_token":"` + rt + `","tenant":"1"}`,
		"empty":              `{"refresh_token":""}`,
		"not an object":      `"` + rt + `"`,
		"two values, one ok": `{"refresh_token":"` + rt + `"} {}`,
	} {
		for _, path := range []string{"/fortnox/tenants/1234567/refresh_token", "/fortnox/refresh_tokens"} {
			method := http.MethodPut
			if path == "/fortnox/refresh_tokens" {
				method = http.MethodPost
			}
			status, answer := sc.admin(method, path, body)
			if status != http.StatusBadRequest || !strings.Contains(answer, `"error"`) {
				t.Errorf("%s to %s: %d %s", name, path, status, answer)
			}
		}
	}
	if n := fake.TokenRequests("", ""); n != 0 {
		t.Errorf("%d token requests for refused input", n)
	}
	if !fake.RefreshTokenValid(rt) {
		t.Error("the token was spent")
	}
}

// No error text names an absolute path: not the admin API's, not the
// app's 503 for a storage failure. A truncated record says so.
func TestStorageErrorsNameNoPath(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	// A file where the plugin's folder should be: every store fails.
	if err := os.MkdirAll(filepath.Join(sc.dir, "storage"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sc.dir, "storage", "fortnox"), []byte("in the way"), 0o600); err != nil {
		t.Fatal(err)
	}
	status, body := sc.admin(http.MethodPut, "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"`+fake.IssueRefreshToken(testClientID, "1234567")+`"}`)
	if status < 500 || strings.Contains(body, sc.dir) || strings.Contains(body, "/tmp") {
		t.Errorf("PUT with broken storage: %d %s", status, body)
	}
	status, answer, resp := sc.get("/3/companyinformation", "5550001")
	if status != http.StatusServiceUnavailable || errorAnswer(t, resp, answer).Error != "token_storage_unavailable" || strings.Contains(string(answer), sc.dir) {
		t.Errorf("the app's answer with broken storage: %d %s", status, answer)
	}
	if !strings.Contains(string(answer), "fortnox/test-client/5550001.json") {
		t.Errorf("the answer does not name the record's key: %s", answer)
	}
}

func TestTruncatedRecordSaysSo(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	whole, _ := os.ReadFile(sc.recordPath("1234567"))
	if err := os.WriteFile(sc.recordPath("1234567"), whole[:len(whole)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	advance(fake, time.Hour)
	status, body, resp := sc.get("/3/companyinformation", "1234567")
	if e := errorAnswer(t, resp, body); status != http.StatusServiceUnavailable || !strings.Contains(e.Message, "truncated") {
		t.Errorf("%d %s", status, body)
	}
	info := findTenant(sc.tenants(), "1234567")
	if info == nil || info.LastError == nil || !strings.Contains(*info.LastError, "truncated") {
		t.Errorf("row: %+v", info)
	}
}
