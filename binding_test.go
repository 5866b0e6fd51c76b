package fortnox

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// The attack that started the hardening: a refresh token stored under the
// wrong TenantId (one slip in a migration) must never serve that tenant's
// requests with the other company's data. These tests prove, against a
// real Caddy and the fake Fortnox, that every token is checked against its
// tenant, that records are bound to their keys, and that nothing Fortnox
// returns is lost on the way.

var regexpHex40 = regexp.MustCompile(`[0-9a-f]{40}`)

// quarantine lists GET /fortnox/quarantine.
func (s *sidecar) quarantine() []tokens.QuarantineInfo {
	s.t.Helper()
	status, body := s.admin(http.MethodGet, "/fortnox/quarantine", "")
	if status != http.StatusOK {
		s.t.Fatalf("GET /fortnox/quarantine: %d %s", status, body)
	}
	var out []tokens.QuarantineInfo
	if err := json.Unmarshal([]byte(body), &out); err != nil {
		s.t.Fatalf("GET /fortnox/quarantine: %v: %s", err, body)
	}
	return out
}

// noCompanyDataOf fails when any answer the app got holds tenant's company.
func noCompanyDataOf(t *testing.T, body []byte, tenant string) {
	t.Helper()
	if bytes.Contains(body, []byte("Fake Company "+tenant)) || bytes.Contains(body, []byte(`"DatabaseNumber":`+tenant)) {
		t.Fatalf("the app got tenant %s's company data: %s", tenant, body)
	}
}

// PUT of another tenant's refresh token: spent once to learn whose it is,
// 409 naming both ids, never stored under the tenant asked for, nor under
// its own tenant (a name chosen for one company must not become live for
// another): the new refresh token is quarantined, listed on its own
// tenant's row, until an operator releases it there.
func TestHandedOverTokenOfAnotherTenantIsQuarantined(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	foreign := fake.IssueRefreshToken(testClientID, "7654321")

	status, body := sc.admin(http.MethodPut, "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"`+foreign+`"}`)
	if status != http.StatusConflict || !strings.Contains(body, `"tenant_mismatch"`) ||
		!strings.Contains(body, "The refresh token handed over for 1234567 belongs to 7654321.") || !strings.Contains(body, "kept in the quarantine as") {
		t.Fatalf("PUT of tenant 7654321's token for 1234567: %d %s", status, body)
	}
	if strings.Contains(body, foreign) {
		t.Fatal("the answer holds the token")
	}
	for _, tenant := range []string{"1234567", "7654321"} {
		if _, err := os.Stat(sc.recordPath(tenant)); err == nil {
			t.Errorf("a record was written for %s", tenant)
		}
		// Neither tenant is served with it.
		status, answer, resp := sc.get("/3/companyinformation", tenant)
		if tenant == "1234567" {
			noCompanyDataOf(t, answer, "7654321")
		}
		if status != http.StatusForbidden || errorAnswer(t, resp, answer).Error != "tenant_not_authorized" {
			t.Errorf("tenant %s after the slip: %d %s", tenant, status, answer)
		}
	}
	if n := fake.APICalls(""); n != 0 {
		t.Errorf("%d requests reached Fortnox", n)
	}
	if n := fake.LiveRefreshTokens(testClientID, "7654321", ""); n != 1 {
		t.Errorf("%d live refresh tokens for 7654321, want the quarantined one", n)
	}
	q := sc.quarantine()
	if len(q) != 1 || q[0].Tenant == nil || *q[0].Tenant != "7654321" || q[0].SubmittedFor != "1234567" || !strings.Contains(body, q[0].ID) {
		t.Fatalf("quarantine: %+v", q)
	}
	// GET /fortnox/tenants lists it on its own tenant's row (otherwise
	// unknown), never on the one it was handed over for.
	row := findTenant(sc.tenants(), "7654321")
	if row == nil || row.HasRefreshToken || len(row.Quarantined) != 1 {
		t.Fatalf("tenant 7654321's row: %+v", row)
	}
	if e := row.Quarantined[0]; e.ID != q[0].ID || e.Account != "" || e.HandedOverFor != "1234567" || e.At.IsZero() {
		t.Errorf("quarantined entry: %+v", e)
	}
	if other := findTenant(sc.tenants(), "1234567"); other != nil && len(other.Quarantined) != 0 {
		t.Errorf("tenant 1234567's row lists the quarantine: %+v", other)
	}
	_, raw := sc.admin(http.MethodGet, "/fortnox/tenants", "")
	if !strings.Contains(raw, `"quarantined":[{"id":"`+q[0].ID+`","account":"","handed_over_for":"1234567","at":"`) {
		t.Errorf("GET /fortnox/tenants: %s", raw)
	}
	if strings.Contains(raw, "eyJ") || regexpHex40.MatchString(raw) {
		t.Errorf("the tenants listing holds a token: %s", raw)
	}

	// The operator releases it: served under its own tenant now.
	status, body = sc.admin(http.MethodPost, "/fortnox/quarantine/"+q[0].ID+"/release", "")
	if status != http.StatusOK || body != `{"account":"","tenant":"7654321"}`+"\n" {
		t.Fatalf("release: %d %s", status, body)
	}
	rec := sc.storedRecord("7654321")
	if !fake.RefreshTokenValid(rec.RefreshToken) || rec.Tenant != "7654321" {
		t.Fatalf("tenant 7654321's record: live=%v tenant=%s", fake.RefreshTokenValid(rec.RefreshToken), rec.Tenant)
	}
	advance(fake, 2*time.Hour) // the access token that came with it has expired: the chain goes on
	if status, answer, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusOK || companyNumber(t, answer) != "7654321" {
		t.Errorf("tenant 7654321 after the release: %d %s", status, answer)
	}
	if status, answer, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusForbidden {
		noCompanyDataOf(t, answer, "7654321")
		t.Errorf("tenant 1234567 after the release: %d %s", status, answer)
	}
	if q := sc.quarantine(); len(q) != 0 {
		t.Errorf("quarantine after the release: %+v", q)
	}
	if row := findTenant(sc.tenants(), "7654321"); row == nil || !row.HasRefreshToken || len(row.Quarantined) != 0 {
		t.Errorf("tenant 7654321's row after the release: %+v", row)
	}
	if n := fake.LiveRefreshTokens(testClientID, "7654321", ""); n != 1 {
		t.Errorf("%d live refresh tokens for 7654321, want its one chain", n)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
	// Released once: it is gone.
	if status, body := sc.admin(http.MethodPost, "/fortnox/quarantine/"+q[0].ID+"/release", ""); status != http.StatusNotFound || !strings.Contains(body, `"unknown_id"`) {
		t.Errorf("release again: %d %s", status, body)
	}
	for path, want := range map[string]int{
		"/fortnox/quarantine/not-an-id/release":              http.StatusBadRequest,
		"/fortnox/quarantine/20260101T000000-abcdef/release": http.StatusNotFound,
	} {
		if status, body := sc.admin(http.MethodPost, path, ""); status != want || !strings.Contains(body, `"error"`) {
			t.Errorf("POST %s: %d %s, want %d", path, status, body, want)
		}
	}
	if status, _ := sc.admin(http.MethodGet, "/fortnox/quarantine/"+q[0].ID+"/release", ""); status != http.StatusMethodNotAllowed {
		t.Errorf("GET of release: %d", status)
	}
}

// When the token's own tenant already has a live refresh token, the new one
// is kept in quarantine: listed (never with the token), never used, and
// removable.
func TestHandedOverTokenGoesToQuarantine(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
	ownBefore := sc.storedRecord("7654321").RefreshToken
	foreign := fake.IssueRefreshToken(testClientID, "7654321")

	status, body := sc.admin(http.MethodPut, "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"`+foreign+`"}`)
	if status != http.StatusConflict || !strings.Contains(body, "tenant_mismatch") || !strings.Contains(body, "quarantine") {
		t.Fatalf("PUT: %d %s", status, body)
	}
	if got := sc.storedRecord("7654321").RefreshToken; got != ownBefore {
		t.Error("tenant 7654321's live refresh token was overwritten")
	}
	q := sc.quarantine()
	if len(q) != 1 || q[0].Tenant == nil || *q[0].Tenant != "7654321" || q[0].SubmittedFor != "1234567" {
		t.Fatalf("quarantine: %+v", q)
	}
	_, raw := sc.admin(http.MethodGet, "/fortnox/quarantine", "")
	if strings.Contains(raw, "eyJ") || regexpHex40.MatchString(raw) {
		t.Errorf("the quarantine listing holds a token: %s", raw)
	}
	// Both chains are alive: nothing was lost.
	if n := fake.LiveRefreshTokens(testClientID, "7654321", ""); n != 2 {
		t.Errorf("%d live refresh tokens for 7654321, want 2 (its own and the quarantined one)", n)
	}
	if status, answer, _ := sc.get("/3/companyinformation", "1234567"); status == http.StatusOK {
		noCompanyDataOf(t, answer, "7654321")
		t.Fatalf("tenant 1234567 was served: %s", answer)
	}
	// A release never overwrites a live chain: 409, nothing changed.
	status, body = sc.admin(http.MethodPost, "/fortnox/quarantine/"+q[0].ID+"/release", "")
	if status != http.StatusConflict || !strings.Contains(body, `"live_refresh_token"`) || !strings.Contains(body, "tenant 7654321 already has a live refresh token") {
		t.Errorf("release over a live chain: %d %s", status, body)
	}
	if got := sc.storedRecord("7654321").RefreshToken; got != ownBefore {
		t.Error("the release overwrote tenant 7654321's live refresh token")
	}
	if after := sc.quarantine(); len(after) != 1 || after[0].ID != q[0].ID {
		t.Errorf("the refused release changed the quarantine: %+v", after)
	}
	if n := fake.LiveRefreshTokens(testClientID, "7654321", ""); n != 2 {
		t.Errorf("%d live refresh tokens for 7654321 after the refused release, want 2", n)
	}
	if status, body := sc.admin(http.MethodDelete, "/fortnox/quarantine/"+q[0].ID, ""); status != http.StatusNoContent {
		t.Fatalf("DELETE quarantine: %d %s", status, body)
	}
	if q := sc.quarantine(); len(q) != 0 {
		t.Errorf("after DELETE: %+v", q)
	}
	if row := findTenant(sc.tenants(), "7654321"); row == nil || len(row.Quarantined) != 0 {
		t.Errorf("tenant 7654321's row after DELETE: %+v", row)
	}
	if status, _ := sc.admin(http.MethodDelete, "/fortnox/quarantine/"+q[0].ID, ""); status != http.StatusNotFound {
		t.Errorf("DELETE again: %d", status)
	}
}

// A record whose refresh token belongs to another tenant (the record says
// 1234567, the token is 7654321's: an old import, or a hand-edited file)
// is refreshed once: the new token names 7654321, so it is not used for
// 1234567; the record is marked, and the new refresh token is kept. The
// real tenant's live refresh token is never overwritten.
func TestStoredRefreshTokenOfAnotherTenant(t *testing.T) {
	for _, ownerHasOne := range []bool{false, true} {
		name := "owner has none"
		if ownerHasOne {
			name = "owner has one"
		}
		t.Run(name, func(t *testing.T) {
			fake := startFake(t, fakefortnox.Options{RateLimit: -1})
			sc := startSidecar(t, fake, "")
			var ownerRT string
			if ownerHasOne {
				sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
				ownerRT = sc.storedRecord("7654321").RefreshToken
			}
			writeRecord(t, sc, "1234567", tokens.Record{Tenant: "1234567", ClientID: testClientID, Mode: tokens.GrantRefreshToken,
				RefreshToken: fake.IssueRefreshToken(testClientID, "7654321")})

			for i := range 3 {
				status, body, resp := sc.get("/3/companyinformation", "1234567")
				noCompanyDataOf(t, body, "7654321")
				if status != http.StatusConflict || errorAnswer(t, resp, body).Error != "tenant_mismatch" {
					t.Fatalf("request %d: %d %s", i, status, body)
				}
				if !strings.Contains(string(body), "7654321") {
					t.Errorf("the answer does not name the token's tenant: %s", body)
				}
				advance(fake, 2*time.Minute) // past the backoff
			}
			if n := fake.TokenRequests("refresh_token", "7654321"); n != 1+boolInt(ownerHasOne) {
				t.Errorf("%d refreshes of 7654321's tokens, want the stored one spent once", n)
			}
			rec := sc.storedRecord("1234567")
			if rec.RefreshToken != "" || rec.MismatchTenant != "7654321" {
				t.Errorf("tenant 1234567's record is not marked: %+v", rec)
			}
			info := findTenant(sc.tenants(), "1234567")
			if info == nil || info.LastError == nil || !strings.Contains(*info.LastError, "tenant_mismatch") {
				t.Errorf("GET /fortnox/tenants does not show the mismatch: %+v", info)
			}
			errorLines := 0
			for _, l := range sc.logLines("a refresh token stored for the tenant belongs to another: its token was not used") {
				if l["level"] == "error" && l["tenant"] == "1234567" && l["token_tenant"] == "7654321" {
					errorLines++
				}
			}
			if errorLines != 1 {
				t.Errorf("%d ERROR lines, want 1", errorLines)
			}
			// Nothing lost: the new refresh token is live, in the
			// quarantine, and served under no name.
			if n := fake.LiveRefreshTokens(testClientID, "7654321", ""); n != 1+boolInt(ownerHasOne) {
				t.Errorf("%d live refresh tokens for 7654321", n)
			}
			q := sc.quarantine()
			if len(q) != 1 || q[0].Tenant == nil || *q[0].Tenant != "7654321" || q[0].SubmittedFor != "1234567" {
				t.Fatalf("quarantine: %+v", q)
			}
			if row := findTenant(sc.tenants(), "7654321"); row == nil || len(row.Quarantined) != 1 || row.Quarantined[0].HandedOverFor != "1234567" {
				t.Errorf("tenant 7654321's row: %+v", row)
			}
			if ownerHasOne {
				if got := sc.storedRecord("7654321").RefreshToken; got != ownerRT {
					t.Error("the real tenant's live refresh token was overwritten")
				}
			} else {
				if _, err := os.Stat(sc.recordPath("7654321")); err == nil {
					t.Error("the new refresh token was stored under its own tenant without a release")
				}
				if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusForbidden {
					t.Errorf("tenant 7654321 was served with the quarantined token: %d %s", status, body)
				}
			}
		})
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// writeRecord writes a plain record file as an operator (or an attacker)
// would.
func writeRecord(t *testing.T, sc *sidecar, tenant string, rec tokens.Record) {
	t.Helper()
	raw, _ := json.Marshal(rec)
	path := sc.recordPath(tenant)
	if err := os.MkdirAll(strings.TrimSuffix(path, "/"+tenant+".json"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
}

// A record copied to another tenant's key is refused, with and without
// encryption_key, and is never overwritten (not by a request, not by an
// admin PUT); the real tenant's record is untouched.
func TestCopiedRecordIsRefusedAndNotOverwritten(t *testing.T) {
	for _, encrypted := range []bool{false, true} {
		name := "plain"
		options := ""
		if encrypted {
			name = "encrypted"
			t.Setenv("FORTNOX_TEST_KEY", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
			options = "encryption_key {env.FORTNOX_TEST_KEY}"
		}
		t.Run(name, func(t *testing.T) {
			fake := startFake(t, fakefortnox.Options{RateLimit: -1})
			sc := startSidecar(t, fake, options)
			sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
			original, _ := os.ReadFile(sc.recordPath("7654321"))
			if err := os.WriteFile(sc.recordPath("1234567"), original, 0o600); err != nil {
				t.Fatal(err)
			}
			advance(fake, 2*time.Hour) // no access token is fresh: a request would refresh

			status, body, resp := sc.get("/3/companyinformation", "1234567")
			noCompanyDataOf(t, body, "7654321")
			want := "tenant_mismatch"
			if encrypted {
				want = "token_storage_unavailable" // the cipher binds it: it does not decrypt under another key
			}
			if e := errorAnswer(t, resp, body); status == http.StatusOK || e.Error != want {
				t.Fatalf("copied record: %d %s", status, body)
			}
			if strings.Contains(string(body), sc.dir) {
				t.Errorf("the answer names a path: %s", body)
			}
			if st, b := sc.admin(http.MethodPut, "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"`+fake.IssueRefreshToken(testClientID, "1234567")+`"}`); st != http.StatusConflict {
				t.Errorf("PUT over the copied record: %d %s", st, b)
			}
			if n := fake.TokenRequests("refresh_token", ""); n != 1 {
				t.Errorf("%d refreshes: the copied record's token (or the PUT's) was spent", n-1)
			}
			for _, tenant := range []string{"1234567", "7654321"} {
				if after, _ := os.ReadFile(sc.recordPath(tenant)); !bytes.Equal(after, original) {
					t.Errorf("record %s was changed", tenant)
				}
			}
			if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusOK || companyNumber(t, body) != "7654321" {
				t.Errorf("the real tenant: %d %s", status, body)
			}
		})
	}
}

// A client-credentials token that names another tenant is never used or
// cached: 409 naming both ids, an ERROR log line, last_error.
func TestClientCredentialsTokenOfAnotherTenant(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.MisbindClientCredentials(testClientID, "1234567", "7654321")
	sc := startSidecar(t, fake, "")
	status, body, resp := sc.get("/3/companyinformation", "1234567")
	noCompanyDataOf(t, body, "7654321")
	if e := errorAnswer(t, resp, body); status != http.StatusConflict || e.Error != "tenant_mismatch" ||
		!strings.Contains(e.Message, "1234567") || !strings.Contains(e.Message, "7654321") {
		t.Fatalf("%d %s", status, body)
	}
	if n := fake.APICalls(""); n != 0 {
		t.Errorf("%d requests reached Fortnox with the wrong token", n)
	}
	if _, cached := sc.manager().Cache.Get("1234567"); cached {
		t.Error("the token was cached")
	}
	info := findTenant(sc.tenants(), "1234567")
	if info == nil || info.LastError == nil || !strings.Contains(*info.LastError, "tenant_mismatch") {
		t.Errorf("row: %+v", info)
	}
	lines := sc.logLines("token request failed")
	if len(lines) == 0 || lines[0]["level"] != "error" || lines[0]["outcome"] != "tenant_mismatch" {
		t.Errorf("log: %v", lines)
	}
	// Fortnox fixes itself: after the backoff the tenant is served.
	fake.MisbindClientCredentials(testClientID, "1234567", "")
	advance(fake, 2*time.Minute)
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK || companyNumber(t, body) != "1234567" {
		t.Errorf("after the fix: %d %s", status, body)
	}
}

// A token without a readable tenantId is accepted only from client
// credentials (the TenantId header binds it); from a refresh it is refused
// and its refresh token kept.
func TestTokenWithoutTenantClaim(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.SetOmitTenantClaim(true)
	sc := startSidecar(t, fake, "")
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK || companyNumber(t, body) != "1234567" {
		t.Fatalf("client credentials without a tenant claim: %d %s", status, body)
	}
	fake.SetOmitTenantClaim(false)
	rt := fake.IssueRefreshToken(testClientID, "5550001")
	fake.SetOmitTenantClaim(true)
	status, body := sc.admin(http.MethodPut, "/fortnox/tenants/5550001/refresh_token", `{"refresh_token":"`+rt+`"}`)
	if status != http.StatusConflict || !strings.Contains(body, "names no tenant") || !strings.Contains(body, "quarantine") {
		t.Fatalf("PUT of a token whose answer names no tenant: %d %s", status, body)
	}
	q := sc.quarantine()
	if len(q) != 1 || q[0].Tenant != nil || q[0].SubmittedFor != "5550001" {
		t.Fatalf("quarantine: %+v", q)
	}
	// It belongs to no tenant: listed on none, and cannot be released.
	for _, row := range sc.tenants() {
		if len(row.Quarantined) != 0 {
			t.Errorf("tenant %s lists a token that names no tenant: %+v", row.Tenant, row.Quarantined)
		}
	}
	if status, body := sc.admin(http.MethodPost, "/fortnox/quarantine/"+q[0].ID+"/release", ""); status != http.StatusConflict || !strings.Contains(body, `"tenant_unknown"`) {
		t.Errorf("release of a token that names no tenant: %d %s", status, body)
	}
	if after := sc.quarantine(); len(after) != 1 {
		t.Errorf("the refused release changed the quarantine: %+v", after)
	}
	if n := fake.LiveRefreshTokens(testClientID, "5550001", ""); n != 1 {
		t.Errorf("%d live refresh tokens: the answer was lost", n)
	}
}

// A stored access token that names another tenant (a tampered record) is
// never sent, and the record is not overwritten.
func TestStoredAccessTokenOfAnotherTenant(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
	foreign := sc.storedRecord("7654321")
	writeRecord(t, sc, "1234567", tokens.Record{Tenant: "1234567", ClientID: testClientID, Mode: tokens.GrantRefreshToken,
		RefreshToken: fake.IssueRefreshToken(testClientID, "1234567"), AccessToken: foreign.AccessToken,
		IssuedAt: foreign.IssuedAt, ExpiresAt: foreign.ExpiresAt})
	before, _ := os.ReadFile(sc.recordPath("1234567"))
	status, body, resp := sc.get("/3/companyinformation", "1234567")
	noCompanyDataOf(t, body, "7654321")
	if status != http.StatusConflict || errorAnswer(t, resp, body).Error != "tenant_mismatch" {
		t.Fatalf("%d %s", status, body)
	}
	if after, _ := os.ReadFile(sc.recordPath("1234567")); !bytes.Equal(before, after) {
		t.Error("the tampered record was overwritten")
	}
	if n := fake.APICalls("7654321"); n != 0 {
		t.Errorf("%d requests reached Fortnox with 7654321's token", n)
	}
}
