package fortnox

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddyserver/caddy/v2"
)

// Named user accounts beside the service account (issue 12), end to end: a
// real Caddy, the fake Fortnox, and the user each request reached Fortnox
// as (the userId of its token, which the fake records).

// The users behind the accounts in these tests: anna is Fortnox user 7,
// bo user 8.
const (
	annaUser = "7"
	boUser   = "8"
)

// putAccountToken hands over a user's refresh token for a named account
// and fails unless the admin API answers 204.
func (s *sidecar) putAccountToken(tenant, name, rt string) {
	s.t.Helper()
	if status, body := s.admin(http.MethodPut, "/fortnox/tenants/"+tenant+"/accounts/"+name+"/refresh_token", `{"refresh_token":"`+rt+`"}`); status != http.StatusNoContent {
		s.t.Fatalf("PUT account %s of %s: %d %s", name, tenant, status, body)
	}
}

// asAccount sends a request for tenant as the named account ("" = no
// account header: the service account).
func (s *sidecar) asAccount(method, path, tenant, account string) (int, []byte, *http.Response) {
	s.t.Helper()
	var header http.Header
	if account != "" {
		header = http.Header{DefaultAccountHeader: {account}}
	}
	return s.do(method, path, tenant, nil, header)
}

func (s *sidecar) accountRecordPath(tenant, name string) string {
	return filepath.Join(s.dir, "storage", "fortnox", testClientID, "accounts", tenant, name+".json")
}

// storedAccountRecord reads a named account's plain record from storage.
func (s *sidecar) storedAccountRecord(tenant, name string) *tokens.Record {
	s.t.Helper()
	return s.readRecordFile(s.accountRecordPath(tenant, name))
}

// echoed is the fake's echo answer to a /3/ request it served.
type echoed struct {
	TenantID string `json:"TenantId"`
	UserID   string `json:"UserId"`
}

// decodeEcho decodes the fake's echo answer: whose token the request
// carried.
func decodeEcho(body []byte) (echoed, error) {
	var v struct{ Echo *echoed }
	if err := json.Unmarshal(body, &v); err != nil || v.Echo == nil {
		return echoed{}, fmt.Errorf("not an echo answer (%v): %s", err, body)
	}
	return *v.Echo, nil
}

// echoOf is decodeEcho for the test's own goroutine.
func echoOf(t testing.TB, body []byte) echoed {
	t.Helper()
	e, err := decodeEcho(body)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func findAccount(info *tokens.TenantInfo, name string) *tokens.AccountInfo {
	if info == nil {
		return nil
	}
	for i := range info.Accounts {
		if info.Accounts[i].Name == name {
			return &info.Accounts[i]
		}
	}
	return nil
}

// expectNoAccountInMetrics fails when a label value on /metrics is an
// account name or a tenant.
func expectNoAccountInMetrics(t *testing.T, sc *sidecar, names ...string) {
	t.Helper()
	for sample := range scrape(t, sc) {
		_, labels, _ := strings.Cut(sample, "{")
		for _, name := range names {
			if strings.Contains(labels, `"`+name+`"`) {
				t.Errorf("metric %s carries %q as a label value", sample, name)
			}
		}
	}
}

// For one tenant, requests without the account header use the service
// account's client-credentials token, and requests naming anna or bo their
// own users' tokens. Mixed concurrent requests each carry their own
// account's token, and all accounts share the tenant's one rate budget:
// Fortnox (25 per second here) answers no 429. No metric names an account.
func TestAccountsBesideTheServiceAccount(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: 25, RateWindow: time.Second})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "rate_limit 25 1200ms\nmax_wait 20s")
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	sc.putAccountToken("1234567", "bo", fake.IssueUserRefreshToken(testClientID, "1234567", boUser))
	wantUser := map[string]string{"": "", "anna": annaUser, "bo": boUser}

	for _, account := range []string{"", "anna", "bo"} {
		status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", account)
		if status != http.StatusOK {
			t.Fatalf("account %q: %d %s", account, status, body)
		}
		if e := echoOf(t, body); e.TenantID != "1234567" || e.UserID != wantUser[account] {
			t.Errorf("account %q reached Fortnox as tenant %s, user %q; want user %q", account, e.TenantID, e.UserID, wantUser[account])
		}
	}
	if n := fake.TokenRequests("client_credentials", "1234567"); n != 1 {
		t.Errorf("%d client-credentials requests, want 1 (the service account's)", n)
	}
	if n := fake.TokenRequests("refresh_token", "1234567"); n != 2 {
		t.Errorf("%d refreshes, want the two hand-overs only (their access tokens serve the accounts)", n)
	}

	const concurrent = 60
	accounts := []string{"", "anna", "bo"}
	var wg sync.WaitGroup
	failures := make(chan string, concurrent)
	for i := range concurrent {
		account := accounts[i%len(accounts)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, body, _ := sc.asAccount(http.MethodGet, fmt.Sprintf("/3/invoices/%d", i), "1234567", account)
			if status != http.StatusOK {
				failures <- fmt.Sprintf("request %d as %q: %d %s", i, account, status, body)
				return
			}
			if e, err := decodeEcho(body); err != nil || e.TenantID != "1234567" || e.UserID != wantUser[account] {
				failures <- fmt.Sprintf("request %d as %q reached Fortnox as tenant %s, user %q (%v)", i, account, e.TenantID, e.UserID, err)
			}
		}()
	}
	wg.Wait()
	close(failures)
	for f := range failures {
		t.Error(f)
	}
	if n := fake.TooMany(""); n != 0 {
		t.Errorf("Fortnox answered 429 %d times: the accounts did not share the tenant's budget", n)
	}
	served := map[string]int{}
	for _, r := range fake.APIRequests() {
		if r.Status == http.StatusOK {
			served[r.User]++
		}
		if r.Header.Get(DefaultAccountHeader) != "" {
			t.Errorf("the account header reached Fortnox: %q", r.Header.Get(DefaultAccountHeader))
		}
	}
	if served[""] != 21 || served[annaUser] != 21 || served[boUser] != 21 {
		t.Errorf("requests served by user: %v, want 21 each for the service account, anna and bo", served)
	}
	if n := fake.TokenRequests("", ""); n != 3 {
		t.Errorf("%d token requests in all, want 3 (one per account: the rest were cached)", n)
	}
	expectNoAccountInMetrics(t, sc, "anna", "bo", "1234567")
}

// A request naming an account the tenant does not have (unknown, another
// tenant's, or another case) gets 403 account_not_authorized, and nothing
// reaches Fortnox: never the service account's token. Malformed names get
// 400. The header never reaches Fortnox, not through Connection and not as
// a trailer.
func TestAccountRefusals(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.GrantConsent(testClientID, "7654321")
	sc := startSidecar(t, fake, "")
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	sc.putAccountToken("7654321", "bo", fake.IssueUserRefreshToken(testClientID, "7654321", boUser))
	// The service account's token is cached: it is there to be misused.
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", ""); status != http.StatusOK {
		t.Fatalf("service account: %d %s", status, body)
	}
	reached := len(fake.APIRequests())
	tokenRequests := fake.TokenRequests("", "")

	for what, account := range map[string]string{
		"an unknown account":        "zoe",
		"another tenant's account":  "bo",
		"another case":              "Anna",
		"the longest name, unknown": strings.Repeat("a", 64),
		"every allowed character":   "a.B_c@d-9",
	} {
		status, body, resp := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", account)
		if status != http.StatusForbidden {
			t.Errorf("%s: %d %s, want 403", what, status, body)
			continue
		}
		e := errorAnswer(t, resp, body)
		if e.Error != "account_not_authorized" || !strings.Contains(e.Message, "?account="+account+"&tenant=1234567") ||
			!strings.Contains(e.Message, "PUT /tenants/1234567/accounts/"+account+"/refresh_token with {\"refresh_token\":\"…\"} on the sidecar's hand-over route (fortnox_handover)") ||
			strings.Contains(e.Message, "admin") {
			t.Errorf("%s: %+v, want account_not_authorized saying how to connect this account", what, e)
		}
	}
	if n := len(fake.APIRequests()) - reached; n != 0 {
		t.Errorf("%d refused requests reached Fortnox", n)
	}
	if n := fake.TokenRequests("", "") - tokenRequests; n != 0 {
		t.Errorf("%d token requests for accounts that have no refresh token", n)
	}

	for what, tc := range map[string]struct {
		values []string
		code   string
	}{
		"65 characters":     {[]string{strings.Repeat("a", 65)}, "invalid_account"},
		"a space":           {[]string{"anna berg"}, "invalid_account"},
		"a slash":           {[]string{"anna/../bo"}, "invalid_account"},
		"two dots":          {[]string{".."}, "invalid_account"},
		"one dot":           {[]string{"."}, "invalid_account"},
		"non-ASCII":         {[]string{"åsa"}, "invalid_account"},
		"empty":             {[]string{""}, "invalid_account"},
		"a list":            {[]string{"anna,bo"}, "invalid_account"},
		"two headers":       {[]string{"anna", "anna"}, "ambiguous_account"},
		"two other headers": {[]string{"anna", "bo"}, "ambiguous_account"},
	} {
		status, body, resp := sc.do(http.MethodGet, "/3/invoices", "1234567", nil, http.Header{DefaultAccountHeader: tc.values})
		if status != http.StatusBadRequest {
			t.Errorf("%s: %d %s, want 400", what, status, body)
			continue
		}
		if e := errorAnswer(t, resp, body); e.Error != tc.code || !strings.Contains(e.Message, DefaultAccountHeader) {
			t.Errorf("%s: %+v, want %s naming the header", what, e, tc.code)
		}
	}
	if n := len(fake.APIRequests()) - reached; n != 0 {
		t.Errorf("%d malformed requests reached Fortnox", n)
	}

	// The header, named in Connection and sent again as a trailer (naming
	// another account), is gone by the time the request reaches Fortnox;
	// the request is anna's, and other trailers go through.
	for _, size := range []int{10, 4000} { // kept for a replay, and streamed
		body := strings.Repeat("x", size)
		status, answer := sc.rawRequest(fmt.Sprintf("POST /3/invoices HTTP/1.1\nHost: 127.0.0.1\nX-Fortnox-Tenant: 1234567\nX-Fortnox-Account: anna\nConnection: X-Fortnox-Account\nTransfer-Encoding: chunked\nTrailer: X-Fortnox-Account, X-Other\n\n%x\n%s\n0\nX-Fortnox-Account: bo\nX-Other: kept\n\n", size, body))
		if status != http.StatusOK {
			t.Fatalf("%d-byte body: %d %s", size, status, answer)
		}
		reqs := fake.APIRequests()
		got := reqs[len(reqs)-1]
		if got.User != annaUser || len(got.Body) != size {
			t.Errorf("%d-byte body reached Fortnox as user %q with %d bytes, want anna's", size, got.User, len(got.Body))
		}
		if v := got.Header.Get(DefaultAccountHeader); v != "" {
			t.Errorf("%d-byte body: the account header reached Fortnox: %q", size, v)
		}
		if v := got.Trailer.Get(DefaultAccountHeader); v != "" {
			t.Errorf("%d-byte body: the account trailer reached Fortnox: %q", size, v)
		}
		if got.Trailer.Get("X-Other") != "kept" {
			t.Errorf("%d-byte body: other trailers were lost (%v): the test cannot see trailers", size, got.Trailer)
		}
	}
	expectNoAccountInMetrics(t, sc, "anna", "bo", "zoe", "Anna")
}

// account_header names another header: it picks the account and is
// removed; the default header is then an ordinary header that picks
// nothing.
func TestAccountHeaderOption(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "account_header X-Acting-User")
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))

	status, body, _ := sc.do(http.MethodGet, "/3/invoices", "1234567", nil, http.Header{"X-Acting-User": {"anna"}})
	if status != http.StatusOK || echoOf(t, body).UserID != annaUser {
		t.Fatalf("X-Acting-User: anna: %d %s", status, body)
	}
	reqs := fake.APIRequests()
	if v := reqs[len(reqs)-1].Header.Get("X-Acting-User"); v != "" {
		t.Errorf("the configured account header reached Fortnox: %q", v)
	}
	status, body, _ = sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "anna")
	if status != http.StatusOK || echoOf(t, body).UserID != "" {
		t.Errorf("X-Fortnox-Account with account_header X-Acting-User: %d %s, want the service account", status, body)
	}
	status, body, resp := sc.do(http.MethodGet, "/3/invoices", "1234567", nil, http.Header{"X-Acting-User": {"zoe"}})
	if e := errorAnswer(t, resp, body); status != http.StatusForbidden || e.Error != "account_not_authorized" {
		t.Errorf("X-Acting-User: zoe: %d %s", status, body)
	}
}

// A user's chain survives restarts (its record, encrypted with
// encryption_key, is the only copy of the refresh token): each restart
// refreshes it once, with zero invalid_grant. The chain never serves the
// tenant's service account.
func TestAccountChainSurvivesRestart(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	t.Setenv("FORTNOX_TEST_KEY", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
	sc := startSidecar(t, fake, "encryption_key {env.FORTNOX_TEST_KEY}")
	first := fake.IssueUserRefreshToken(testClientID, "1234567", annaUser)
	sc.putAccountToken("1234567", "anna", first)

	const restarts = 3
	for round := range restarts + 1 {
		status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "anna")
		if status != http.StatusOK || echoOf(t, body).UserID != annaUser {
			t.Fatalf("round %d: %d %s", round, status, body)
		}
		if round == restarts {
			break
		}
		caddyStop(t)
		advance(fake, 2*time.Hour) // the access token has expired: the next process must refresh
		if err := sc.load(); err != nil {
			t.Fatal(err)
		}
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
	if n := fake.TokenRequests("refresh_token", "1234567"); n != 1+restarts {
		t.Errorf("%d refreshes, want the hand-over's and one per restart", n)
	}
	if n := fake.LiveRefreshTokens(testClientID, "1234567", annaUser); n != 1 {
		t.Errorf("%d live refresh tokens of anna's chain, want 1", n)
	}
	raw, err := os.ReadFile(sc.accountRecordPath("1234567", "anna"))
	if err != nil {
		t.Fatalf("the account's record: %v", err)
	}
	for _, p := range secretPatterns {
		if p.Match(raw) {
			t.Error("the account's record holds a token in plaintext despite encryption_key")
		}
	}
	status, body, resp := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "")
	if e := errorAnswer(t, resp, body); status != http.StatusForbidden || e.Error != "tenant_not_authorized" {
		t.Errorf("the service account of a tenant with only a user's chain: %d %s", status, body)
	}
}

// An account is bound to the userId of its first chain: a later chain of
// another user for the same name is refused (409 account_user_mismatch)
// and kept in quarantine, nothing lost; the account keeps its user. Once
// the account is deleted, the other user's chain is accepted. A chain of
// another tenant is never stored under the account.
func TestAccountUserBinding(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")

	foreign := fake.IssueUserRefreshToken(testClientID, "7654321", "9")
	status, body := sc.admin(http.MethodPut, "/fortnox/tenants/1234567/accounts/carl/refresh_token", `{"refresh_token":"`+foreign+`"}`)
	if status != http.StatusConflict || !strings.Contains(body, `"tenant_mismatch"`) || !strings.Contains(body, "account carl of tenant 1234567 is for tenant 7654321") ||
		!strings.Contains(body, "PUT /tenants/1234567/accounts/carl/refresh_token") || strings.Contains(body, "/tenants/1234567/refresh_token") {
		t.Errorf("PUT of tenant 7654321's chain for account carl of 1234567: %d %s", status, body)
	}
	if _, err := os.Stat(sc.accountRecordPath("1234567", "carl")); err == nil {
		t.Error("another tenant's chain was stored under the account")
	}
	if n := fake.LiveRefreshTokens(testClientID, "7654321", "9"); n != 1 {
		t.Errorf("%d live refresh tokens of the foreign chain: it was lost", n)
	}
	// It waits in the quarantine, on its own tenant's row, as account carl;
	// released, it serves carl of 7654321, bound to its user.
	row := findTenant(sc.tenants(), "7654321")
	if row == nil || len(row.Quarantined) != 1 || row.Quarantined[0].Account != "carl" || row.Quarantined[0].HandedOverFor != "1234567" {
		t.Fatalf("tenant 7654321's row: %+v", row)
	}
	if _, err := os.Stat(sc.accountRecordPath("7654321", "carl")); err == nil {
		t.Error("the chain was stored under its own tenant before a release")
	}
	if status, body := sc.admin(http.MethodPost, "/fortnox/quarantine/"+row.Quarantined[0].ID+"/release", ""); status != http.StatusOK || body != `{"account":"carl","tenant":"7654321"}`+"\n" {
		t.Fatalf("release: %d %s", status, body)
	}
	if rec := sc.storedAccountRecord("7654321", "carl"); rec.UserID != "9" || !fake.RefreshTokenValid(rec.RefreshToken) {
		t.Errorf("carl of 7654321 after the release: user %q, live %v", rec.UserID, fake.RefreshTokenValid(rec.RefreshToken))
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "7654321", "carl"); status != http.StatusOK || echoOf(t, body).UserID != "9" {
		t.Errorf("carl of 7654321 after the release: %d %s", status, body)
	}

	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	rec := sc.storedAccountRecord("1234567", "anna")
	if rec.UserID != annaUser || rec.Account != "anna" || rec.Tenant != "1234567" {
		t.Fatalf("record: user %q account %q tenant %q", rec.UserID, rec.Account, rec.Tenant)
	}
	if a := findAccount(findTenant(sc.tenants(), "1234567"), "anna"); a == nil || a.UserID == nil || *a.UserID != annaUser {
		t.Errorf("listing: %+v", a)
	}
	annaChain := rec.RefreshToken

	other := fake.IssueUserRefreshToken(testClientID, "1234567", boUser)
	status, body = sc.admin(http.MethodPut, "/fortnox/tenants/1234567/accounts/anna/refresh_token", `{"refresh_token":"`+other+`"}`)
	if status != http.StatusConflict || !strings.Contains(body, `"account_user_mismatch"`) ||
		!strings.Contains(body, "user "+boUser) || !strings.Contains(body, "user "+annaUser) || !strings.Contains(body, "An operator must delete the account") {
		t.Fatalf("PUT of user %s's chain for anna (user %s): %d %s", boUser, annaUser, status, body)
	}
	if strings.Contains(body, other) || strings.Contains(body, "eyJ") || regexpHex40.MatchString(body) {
		t.Errorf("the answer holds a token: %s", body)
	}
	if got := sc.storedAccountRecord("1234567", "anna"); got.RefreshToken != annaChain || got.UserID != annaUser {
		t.Errorf("the account's record changed: user %q, same chain %v", got.UserID, got.RefreshToken == annaChain)
	}
	var q []tokens.QuarantineInfo
	for _, entry := range sc.quarantine() {
		if entry.Account != nil && *entry.Account == "anna" {
			q = append(q, entry)
		}
	}
	if len(q) != 1 || q[0].UserID == nil || *q[0].UserID != boUser || q[0].Account == nil || *q[0].Account != "anna" || q[0].SubmittedFor != "1234567" {
		t.Fatalf("quarantine: %+v", q)
	}
	if n := fake.LiveRefreshTokens(testClientID, "1234567", boUser); n != 1 {
		t.Errorf("%d live refresh tokens of user %s's chain: it was lost", n, boUser)
	}
	// Released, it would overwrite anna's live chain: refused. With anna's
	// chain gone, it is still another user's than anna's: refused too.
	release := "/fortnox/quarantine/" + q[0].ID + "/release"
	if status, body := sc.admin(http.MethodPost, release, ""); status != http.StatusConflict || !strings.Contains(body, `"live_refresh_token"`) {
		t.Errorf("release over anna's live chain: %d %s", status, body)
	}
	annaFile, _ := os.ReadFile(sc.accountRecordPath("1234567", "anna"))
	dead := *rec
	dead.RefreshToken, dead.AccessToken = "", ""
	deadJSON, _ := json.Marshal(dead)
	if err := os.WriteFile(sc.accountRecordPath("1234567", "anna"), deadJSON, 0o600); err != nil {
		t.Fatal(err)
	}
	if status, body := sc.admin(http.MethodPost, release, ""); status != http.StatusConflict || !strings.Contains(body, `"account_user_mismatch"`) {
		t.Errorf("release of user %s's chain to anna (user %s): %d %s", boUser, annaUser, status, body)
	}
	if got := sc.storedAccountRecord("1234567", "anna"); got.UserID != annaUser || got.RefreshToken != "" {
		t.Errorf("a refused release changed anna's record: user %q", got.UserID)
	}
	if err := os.WriteFile(sc.accountRecordPath("1234567", "anna"), annaFile, 0o600); err != nil {
		t.Fatal(err)
	}
	if n := fake.LiveRefreshTokens(testClientID, "1234567", annaUser); n != 1 {
		t.Errorf("%d live refresh tokens of anna's chain", n)
	}
	advance(fake, 2*time.Hour) // requests refresh anna's own chain
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "anna"); status != http.StatusOK || echoOf(t, body).UserID != annaUser {
		t.Fatalf("anna after the refused PUT: %d %s", status, body)
	}

	if status, body := sc.admin(http.MethodDelete, "/fortnox/tenants/1234567/accounts/anna", ""); status != http.StatusNoContent {
		t.Fatalf("DELETE: %d %s", status, body)
	}
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", boUser))
	if got := sc.storedAccountRecord("1234567", "anna"); got.UserID != boUser {
		t.Errorf("after DELETE and PUT, the account is bound to user %q, want %s", got.UserID, boUser)
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "anna"); status != http.StatusOK || echoOf(t, body).UserID != boUser {
		t.Errorf("anna after DELETE and PUT: %d %s, want user %s", status, body, boUser)
	}
}

// A revoked service-account consent (webhook) blocks the tenant's service
// account only: named accounts rest on their users' own consents and keep
// working, through a refresh and a restart.
func TestRevokedConsentBlocksOnlyTheServiceAccount(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, public := connectSidecar(t, fake, "")
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	for _, account := range []string{"", "anna"} {
		if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", account); status != http.StatusOK {
			t.Fatalf("account %q before: %d %s", account, status, body)
		}
	}
	if got := sendEvent(t, public, `{"event":"client_credentials_consent_revoked","tenant_id":1234567}`, "webhook-secret"); got != http.StatusNoContent {
		t.Fatalf("revoked event: %d", got)
	}
	check := func(when string) {
		t.Helper()
		status, body, resp := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "")
		if e := errorAnswer(t, resp, body); status != http.StatusForbidden || e.Error != "consent_revoked" {
			t.Errorf("service account %s: %d %s", when, status, body)
		}
		status, body, _ = sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "anna")
		if status != http.StatusOK || echoOf(t, body).UserID != annaUser {
			t.Errorf("anna %s: %d %s", when, status, body)
		}
	}
	check("after the revocation")
	advance(fake, 2*time.Hour) // anna's token expires: her chain is refreshed
	check("after anna's token expired")
	caddyStop(t)
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	check("after a restart")
	info := findTenant(sc.tenants(), "1234567")
	if info == nil || !info.ConsentRevoked {
		t.Errorf("tenant row: %+v", info)
	}
	if a := findAccount(info, "anna"); a == nil || a.LastError != nil || !a.HasRefreshToken {
		t.Errorf("anna's row: %+v", a)
	}
}

// connectAs starts a connection at link and returns the authorize URL and
// the state cookie.
func startAccountConnect(t *testing.T, link string) (*url.URL, *http.Cookie) {
	t.Helper()
	link = signLink(t, link, time.Hour)
	resp, err := noRedirects.Get(link)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("%s: %d", link, resp.StatusCode)
	}
	loc, _ := url.Parse(resp.Header.Get("Location"))
	for _, c := range resp.Cookies() {
		if strings.HasPrefix(c.Name, stateCookiePrefix) {
			return loc, c
		}
	}
	t.Fatalf("%s set no state cookie", link)
	return nil, nil
}

// The connect flow for a named account (account_type off,
// ?account=anna&tenant=<id>) stores the user's chain under that name,
// bound to the user, and not as the tenant's own. A state cookie edited to
// another account or tenant is refused before any code is exchanged, and a
// token for another tenant than the link expected is not stored under the
// account (and not lost).
func TestConnectUserAccount(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizeAs("1234567", annaUser)
	sc, public := connectSidecar(t, fake, "account_type off")

	loc, cookie := startAccountConnect(t, public+"/fortnox/connect?account=anna&tenant=1234567")
	if q := loc.Query(); q.Has("account_type") || q.Get("access_type") != "offline" || q.Get("state") == "" {
		t.Errorf("authorize query %v: want access_type=offline and no account_type", q)
	}
	status, page := callback(t, authorize(t, loc), cookie)
	if status != http.StatusOK || !strings.Contains(page, `<strong id="tenant">1234567</strong>`) {
		t.Fatalf("callback: %d %s", status, page)
	}
	for _, p := range secretPatterns {
		if p.MatchString(page) {
			t.Error("the success page holds a token")
		}
	}
	rec := sc.storedAccountRecord("1234567", "anna")
	if rec.UserID != annaUser || !fake.RefreshTokenValid(rec.RefreshToken) {
		t.Errorf("anna's record: user %q, live %v", rec.UserID, fake.RefreshTokenValid(rec.RefreshToken))
	}
	if _, err := os.Stat(sc.recordPath("1234567")); err == nil {
		t.Error("the user's chain was also stored as the tenant's own refresh token")
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "anna"); status != http.StatusOK || echoOf(t, body).UserID != annaUser {
		t.Errorf("anna after connecting: %d %s", status, body)
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", ""); status != http.StatusForbidden {
		t.Errorf("the service account (no consent) after a user connected: %d %s", status, body)
	}

	// The state cookie is base64url("1" + JSON).mac.
	exchanges := fake.TokenRequests("authorization_code", "")
	for what, edit := range map[string]func(f *flowCookie){
		"account edited": func(f *flowCookie) { f.Account = "bo" },
		"tenant edited":  func(f *flowCookie) { f.Tenant = "7654321" },
	} {
		loc, cookie := startAccountConnect(t, public+"/fortnox/connect?account=anna&tenant=1234567")
		payload, mac, _ := strings.Cut(cookie.Value, ".")
		raw, err := base64.RawURLEncoding.DecodeString(payload)
		var flow flowCookie
		if err != nil || len(raw) == 0 || json.Unmarshal(raw[1:], &flow) != nil || flow.Account != "anna" {
			t.Fatalf("state cookie %q: %v", cookie.Value, err)
		}
		edit(&flow)
		raw, _ = json.Marshal(flow)
		raw = append([]byte{'1'}, raw...)
		tampered := *cookie
		tampered.Value = base64.RawURLEncoding.EncodeToString(raw) + "." + mac
		if status, page := callback(t, authorize(t, loc), &tampered); status != http.StatusBadRequest || !strings.Contains(page, "did not match") {
			t.Errorf("%s: %d %s", what, status, page)
		}
	}
	if n := fake.TokenRequests("authorization_code", "") - exchanges; n != 0 {
		t.Errorf("%d codes exchanged for tampered states", n)
	}
	for _, path := range []string{sc.accountRecordPath("1234567", "bo"), sc.accountRecordPath("7654321", "anna")} {
		if _, err := os.Stat(path); err == nil {
			t.Errorf("a tampered state stored %s", path)
		}
	}

	// bo picks another company on Fortnox's page than the link expected.
	fake.SetAuthorizeAs("7654321", boUser)
	loc, cookie = startAccountConnect(t, public+"/fortnox/connect?account=bo&tenant=5550001")
	status, page = callback(t, authorize(t, loc), cookie)
	if status != http.StatusConflict || !strings.Contains(page, "the company chosen on Fortnox&#39;s page was 7654321") || !strings.Contains(page, "choose the company 5550001") {
		t.Errorf("a token of tenant 7654321 for a link that expected 5550001: %d %s", status, page)
	}
	for _, p := range secretPatterns {
		if p.MatchString(page) {
			t.Error("the page holds a token")
		}
	}
	if _, err := os.Stat(sc.accountRecordPath("5550001", "bo")); err == nil {
		t.Error("another tenant's token was stored under the account")
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "5550001", "bo"); status != http.StatusForbidden {
		t.Errorf("bo of 5550001: %d %s", status, body)
	}
	if n := fake.LiveRefreshTokens(testClientID, "7654321", boUser); n != 1 {
		t.Errorf("%d live refresh tokens of bo's chain: the new one was lost", n)
	}
	// Quarantined, listed on its own tenant, served under no name there either.
	if row := findTenant(sc.tenants(), "7654321"); row == nil || len(row.Quarantined) != 1 || row.Quarantined[0].Account != "bo" || row.Quarantined[0].HandedOverFor != "5550001" {
		t.Errorf("tenant 7654321's row: %+v", row)
	}
	if _, err := os.Stat(sc.accountRecordPath("7654321", "bo")); err == nil {
		t.Error("another tenant's chain was stored under the account name in its own tenant")
	}

	// Another user follows anna's link: anna's account keeps its user.
	fake.SetAuthorizeAs("1234567", "9")
	annaChain := sc.storedAccountRecord("1234567", "anna").RefreshToken
	loc, cookie = startAccountConnect(t, public+"/fortnox/connect?account=anna&tenant=1234567")
	status, page = callback(t, authorize(t, loc), cookie)
	if status != http.StatusConflict || !strings.Contains(page, "belongs to another Fortnox user") {
		t.Errorf("user 9 on anna's link: %d %s", status, page)
	}
	if rec := sc.storedAccountRecord("1234567", "anna"); rec.UserID != annaUser || rec.RefreshToken != annaChain {
		t.Errorf("anna's record after another user's connection: user %q, same chain %v", rec.UserID, rec.RefreshToken == annaChain)
	}
	if n := fake.LiveRefreshTokens(testClientID, "1234567", "9"); n != 1 {
		t.Errorf("%d live refresh tokens of user 9's chain: it was lost", n)
	}
}

// A connect link that names an account needs account_type off, a valid
// name and a TenantId.
func TestConnectAccountLinks(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	_, public := connectSidecar(t, fake, "")
	resp, err := noRedirects.Get(signLink(t, public+"/fortnox/connect?account=anna&tenant=1234567", time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("?account= with account_type service: %d", resp.StatusCode)
	}

	_, public = connectSidecar(t, fake, "account_type off")
	for _, query := range []string{"account=anna", "tenant=1234567", "account=..&tenant=1234567", "account=anna&tenant=12ab"} {
		resp, err := noRedirects.Get(signLink(t, public+"/fortnox/connect?"+query, time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("?%s: %d, want 400", query, resp.StatusCode)
		}
	}
	if q := fake.LastAuthorizeQuery(); q != nil {
		t.Errorf("a refused link reached Fortnox: %v", q)
	}
}

// The admin API lists accounts (name, user_id, token_expires_at,
// has_refresh_token, last_error; never a token), deletes them (the chain
// stays live at Fortnox), deletes and revokes them (the chain is dead),
// and answers 404 for unknown ones. No answer and no log line holds a
// token.
func TestAccountAdminAPI(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "")
	var answers []string
	admin := func(method, path, body string) (int, string) {
		status, answer := sc.admin(method, path, body)
		answers = append(answers, answer)
		return status, answer
	}
	handed := map[string]string{
		"anna": fake.IssueUserRefreshToken(testClientID, "1234567", annaUser),
		"bo":   fake.IssueUserRefreshToken(testClientID, "1234567", boUser),
		"zoe":  fake.IssueUserRefreshToken(testClientID, "1234567", "9"),
	}
	for name, rt := range handed {
		if status, body := admin(http.MethodPut, "/fortnox/tenants/1234567/accounts/"+name+"/refresh_token", `{"refresh_token":"`+rt+`"}`); status != http.StatusNoContent {
			t.Fatalf("PUT %s: %d %s", name, status, body)
		}
	}
	// Someone else spends zoe's stored refresh token: once her access
	// token expires, her chain is rejected.
	useRefreshToken(t, fake, sc.storedAccountRecord("1234567", "zoe").RefreshToken)
	advance(fake, 2*time.Hour)
	for _, name := range []string{"anna", "bo"} {
		if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", name); status != http.StatusOK {
			t.Fatalf("%s: %d %s", name, status, body)
		}
	}
	status, body, resp := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "zoe")
	if e := errorAnswer(t, resp, body); status != http.StatusForbidden || e.Error != "refresh_token_rejected" ||
		!strings.Contains(e.Message, "account zoe of tenant 1234567") || !strings.Contains(e.Message, "?account=zoe&tenant=1234567") {
		t.Errorf("zoe with a spent chain: %d %s", status, body)
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", ""); status != http.StatusOK {
		t.Fatalf("service account: %d %s", status, body)
	}

	_, listing := admin(http.MethodGet, "/fortnox/tenants", "")
	var infos []tokens.TenantInfo
	if err := json.Unmarshal([]byte(listing), &infos); err != nil {
		t.Fatalf("listing: %v: %s", err, listing)
	}
	info := findTenant(infos, "1234567")
	if info == nil || info.Mode != "client_credentials" || len(info.Accounts) != 3 {
		t.Fatalf("tenant row: %+v", info)
	}
	if names := []string{info.Accounts[0].Name, info.Accounts[1].Name, info.Accounts[2].Name}; strings.Join(names, " ") != "anna bo zoe" {
		t.Errorf("accounts listed as %v, want sorted by name", names)
	}
	for name, user := range map[string]string{"anna": annaUser, "bo": boUser} {
		a := findAccount(info, name)
		if a.UserID == nil || *a.UserID != user || a.TokenExpiresAt == nil || !a.TokenExpiresAt.After(clk.Now()) || !a.HasRefreshToken || a.LastError != nil {
			t.Errorf("%s's row: %+v", name, a)
		}
	}
	if z := findAccount(info, "zoe"); z.HasRefreshToken || z.LastError == nil || !strings.Contains(*z.LastError, "refresh_token_rejected") || z.TokenExpiresAt != nil {
		t.Errorf("zoe's row: %+v", z)
	}
	for _, field := range []string{`"name"`, `"user_id"`, `"token_expires_at"`, `"has_refresh_token"`, `"last_error"`} {
		if strings.Count(listing, field) < 3 {
			t.Errorf("the listing lacks %s for every account: %s", field, listing)
		}
	}

	// DELETE forgets bo; his chain stays live at Fortnox.
	boChain := sc.storedAccountRecord("1234567", "bo").RefreshToken
	if status, body := admin(http.MethodDelete, "/fortnox/tenants/1234567/accounts/bo", ""); status != http.StatusNoContent {
		t.Fatalf("DELETE bo: %d %s", status, body)
	}
	if _, err := os.Stat(sc.accountRecordPath("1234567", "bo")); err == nil {
		t.Error("bo's record is still stored")
	}
	if !fake.RefreshTokenValid(boChain) || fake.Revocations() != 0 {
		t.Errorf("DELETE without revoke: chain live %v, %d revocations", fake.RefreshTokenValid(boChain), fake.Revocations())
	}
	status, body, resp = sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "bo")
	if e := errorAnswer(t, resp, body); status != http.StatusForbidden || e.Error != "account_not_authorized" {
		t.Errorf("bo after DELETE: %d %s (the cached token must go too)", status, body)
	}

	// DELETE ?revoke=true revokes anna's chain at Fortnox first.
	annaChain := sc.storedAccountRecord("1234567", "anna").RefreshToken
	if status, body := admin(http.MethodDelete, "/fortnox/tenants/1234567/accounts/anna?revoke=true", ""); status != http.StatusNoContent {
		t.Fatalf("DELETE anna ?revoke=true: %d %s", status, body)
	}
	if fake.Revocations() != 1 || fake.RefreshTokenValid(annaChain) || fake.LiveRefreshTokens(testClientID, "1234567", annaUser) != 0 {
		t.Errorf("after revoke: %d revocations, chain live %v", fake.Revocations(), fake.RefreshTokenValid(annaChain))
	}
	if _, err := os.Stat(sc.accountRecordPath("1234567", "anna")); err == nil {
		t.Error("anna's record is still stored")
	}
	if info := findTenant(sc.tenants(), "1234567"); findAccount(info, "anna") != nil || findAccount(info, "zoe") == nil {
		t.Errorf("after DELETE ?revoke=true: %+v", info)
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", "anna"); status != http.StatusForbidden {
		t.Errorf("anna after DELETE ?revoke=true: %d %s", status, body)
	}

	for path, want := range map[string]int{
		"/fortnox/tenants/1234567/accounts/carl":                       http.StatusNotFound,
		"/fortnox/tenants/7654321/accounts/anna":                       http.StatusNotFound,
		"/fortnox/tenants/1234567/accounts/" + strings.Repeat("x", 65): http.StatusBadRequest,
		"/fortnox/tenants/1234567/accounts/a%20b":                      http.StatusBadRequest,
		"/fortnox/tenants/12ab/accounts/anna":                          http.StatusBadRequest,
	} {
		status, body := admin(http.MethodDelete, path, "")
		if status != want {
			t.Errorf("DELETE %s: %d %s, want %d", path, status, body, want)
		}
		if want == http.StatusNotFound && !strings.Contains(body, `"unknown_account"`) {
			t.Errorf("DELETE %s: %s, want unknown_account", path, body)
		}
	}
	// An app that still asks for a deleted account sees 403, and the
	// operator sees it asking: the account is listed with that error and
	// without a user, a token or a refresh token.
	_, listing = admin(http.MethodGet, "/fortnox/tenants", "")
	if err := json.Unmarshal([]byte(listing), &infos); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"anna", "bo"} {
		a := findAccount(findTenant(infos, "1234567"), name)
		if a == nil || a.UserID != nil || a.TokenExpiresAt != nil || a.HasRefreshToken || a.LastError == nil || !strings.Contains(*a.LastError, "account_not_authorized") {
			t.Errorf("%s's row after DELETE and a request: %+v", name, a)
		}
	}

	// When Fortnox cannot revoke, nothing is deleted.
	sc.putAccountToken("1234567", "dan", fake.IssueUserRefreshToken(testClientID, "1234567", "10"))
	fake.Close()
	status, answer := admin(http.MethodDelete, "/fortnox/tenants/1234567/accounts/dan?revoke=true", "")
	if status != http.StatusServiceUnavailable || !strings.Contains(answer, `"revoke_failed"`) || !strings.Contains(answer, "nothing was deleted") {
		t.Errorf("DELETE ?revoke=true with Fortnox down: %d %s", status, answer)
	}
	if _, err := os.Stat(sc.accountRecordPath("1234567", "dan")); err != nil {
		t.Errorf("dan's record after a failed revoke: %v", err)
	}

	logged, err := os.ReadFile(sc.logPath())
	if err != nil {
		t.Fatal(err)
	}
	secrets := []string{boChain, annaChain, sc.storedAccountRecord("1234567", "dan").RefreshToken}
	for _, rt := range handed {
		secrets = append(secrets, rt)
	}
	for _, answer := range answers {
		if strings.Contains(answer, "eyJ") || regexpHex40.MatchString(answer) {
			t.Errorf("an admin answer holds a token: %s", answer)
		}
	}
	for _, secret := range secrets {
		if bytes.Contains(logged, []byte(secret)) {
			t.Error("the log holds a refresh token")
		}
	}
	if !bytes.Contains(logged, []byte("account deleted through the admin API")) {
		t.Error("the log does not show the deletes: the scan read the wrong file")
	}
}

// Fortnox's 401 to an account's token (revoked) drops that account's
// token only: the request is replayed with the account's own new token,
// never the service account's, and the service account recovers on its
// own grant.
func TestAccountReplayAfter401(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "")
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	for _, account := range []string{"", "anna"} {
		if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", account); status != http.StatusOK {
			t.Fatalf("account %q: %d %s", account, status, body)
		}
	}
	advance(fake, tokens.FreshTokenGrace)
	fake.RevokeAccessTokens(testClientID, "1234567") // every token of the tenant so far, the users' too
	refreshes, grants := fake.TokenRequests("refresh_token", ""), fake.TokenRequests("client_credentials", "")

	status, body, _ := sc.do(http.MethodPost, "/3/invoices", "1234567", strings.NewReader(`{"Invoice":{}}`), http.Header{DefaultAccountHeader: {"anna"}})
	if status != http.StatusOK || echoOf(t, body).UserID != annaUser {
		t.Fatalf("anna after the revocation: %d %s, want a replay as anna", status, body)
	}
	reqs := fake.APIRequests()
	if last := reqs[len(reqs)-1]; string(last.Body) != `{"Invoice":{}}` {
		t.Errorf("the replay carried %q", last.Body)
	}
	if fake.Unauthorized("1234567") != 1 || fake.TokenRequests("refresh_token", "")-refreshes != 1 || fake.TokenRequests("client_credentials", "") != grants {
		t.Errorf("after anna's 401: %d 401s, %d refreshes, %d client-credentials requests; want 1, 1 (anna's chain), 0",
			fake.Unauthorized("1234567"), fake.TokenRequests("refresh_token", "")-refreshes, fake.TokenRequests("client_credentials", "")-grants)
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "1234567", ""); status != http.StatusOK || echoOf(t, body).UserID != "" {
		t.Errorf("service account after the revocation: %d %s", status, body)
	}
	if n := fake.TokenRequests("client_credentials", "") - grants; n != 1 {
		t.Errorf("%d client-credentials requests for the service account's own 401, want 1", n)
	}
	if n := fake.LiveRefreshTokens(testClientID, "1234567", annaUser); n != 1 {
		t.Errorf("%d live refresh tokens of anna's chain", n)
	}
}

// A stored account record whose refresh token is another tenant's (a
// slip, or a copied file) never serves the account: the refresh is spent
// once, its token is not used (409 naming both tenants and how to connect
// the account), and the new refresh token Fortnox returned is not lost.
func TestAccountChainOfAnotherTenant(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	path := sc.accountRecordPath("1234567", "anna")
	raw, _ := json.Marshal(tokens.Record{Tenant: "1234567", ClientID: testClientID, Account: "anna", Mode: tokens.GrantRefreshToken,
		RefreshToken: fake.IssueUserRefreshToken(testClientID, "7654321", annaUser)})
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		status, body, resp := sc.asAccount(http.MethodGet, "/3/companyinformation", "1234567", "anna")
		noCompanyDataOf(t, body, "7654321")
		e := errorAnswer(t, resp, body)
		if status != http.StatusConflict || e.Error != "tenant_mismatch" || !strings.Contains(e.Message, "account anna of tenant 1234567 is for tenant 7654321") ||
			!strings.Contains(e.Message, "?account=anna&tenant=1234567") {
			t.Fatalf("request %d: %d %s", i, status, body)
		}
		advance(fake, 2*time.Minute) // past the backoff
	}
	if n := fake.TokenRequests("refresh_token", "7654321"); n != 1 {
		t.Errorf("%d refreshes of the foreign chain, want it spent once", n)
	}
	if n := len(fake.APIRequests()); n != 0 {
		t.Errorf("%d requests reached Fortnox", n)
	}
	if n := fake.LiveRefreshTokens(testClientID, "7654321", annaUser); n != 1 {
		t.Errorf("%d live refresh tokens of the foreign chain: the new one was lost", n)
	}
	if rec := sc.storedAccountRecord("1234567", "anna"); rec.RefreshToken != "" || rec.MismatchTenant != "7654321" {
		t.Errorf("the record is not marked: %+v", rec.MismatchTenant)
	}
	// The new refresh token waits in the quarantine; it is not adopted by
	// account anna of 7654321.
	if row := findTenant(sc.tenants(), "7654321"); row == nil || len(row.Quarantined) != 1 || row.Quarantined[0].Account != "anna" || row.Quarantined[0].HandedOverFor != "1234567" {
		t.Errorf("tenant 7654321's row: %+v", row)
	}
	if _, err := os.Stat(sc.accountRecordPath("7654321", "anna")); err == nil {
		t.Error("the chain was stored under account anna of 7654321")
	}
	a := findAccount(findTenant(sc.tenants(), "1234567"), "anna")
	if a == nil || a.HasRefreshToken || a.LastError == nil || !strings.Contains(*a.LastError, "tenant_mismatch") {
		t.Errorf("anna's row: %+v", a)
	}
}

// The keep-alive refreshes named accounts' refresh tokens unused for 30
// days, as it does the tenants' own: after 46 days the chains still work,
// each still bound to its user.
func TestAccountsAreKeptAlive(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "")
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	sc.putAccountToken("7654321", "bo", fake.IssueUserRefreshToken(testClientID, "7654321", boUser))
	m := sc.manager()
	accounts := []struct{ tenant, name, user string }{{"1234567", "anna", annaUser}, {"7654321", "bo", boUser}}

	advance(fake, 20*24*time.Hour)
	if n := m.KeepAlive(); n != 0 {
		t.Fatalf("%d refreshed at 20 days", n)
	}
	if a := findAccount(findTenant(sc.tenants(), "1234567"), "anna"); a == nil || a.RefreshTokenAge == nil || *a.RefreshTokenAge < 20*24*3600 {
		t.Errorf("anna's row at 20 days: %+v", a)
	}
	advance(fake, 11*24*time.Hour)
	if n := m.KeepAlive(); n != 2 {
		t.Fatalf("%d refreshed at 31 days, want both accounts", n)
	}
	for _, acc := range accounts {
		rec := sc.storedAccountRecord(acc.tenant, acc.name)
		if !fake.RefreshTokenValid(rec.RefreshToken) || clk.Now().Sub(rec.RefreshTokenAt) > time.Minute || rec.UserID != acc.user {
			t.Errorf("%s: the stored chain was not renewed (user %q)", acc.name, rec.UserID)
		}
	}
	advance(fake, 15*24*time.Hour) // 46 days after the hand-over: the first tokens would be dead
	for _, acc := range accounts {
		status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", acc.tenant, acc.name)
		if status != http.StatusOK || echoOf(t, body).UserID != acc.user {
			t.Errorf("%s after 46 days: %d %s", acc.name, status, body)
		}
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
}

// `caddy fortnox tenants` against a running sidecar with a client-
// credentials tenant (with a named account), a refresh-token tenant and a
// failing one prints their rows; once the sidecar is gone, it fails saying
// where it looked and what to do.
func TestCommandTenantsAgainstASidecar(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "")
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
	for tenant, want := range map[string]int{"1234567": http.StatusOK, "7654321": http.StatusOK, "5550001": http.StatusForbidden} {
		if status, body, _ := sc.get("/3/companyinformation", tenant); status != want {
			t.Fatalf("%s: %d %s", tenant, status, body)
		}
	}
	advance(fake, 10*time.Minute) // ages and expiries in whole minutes
	addr := strings.TrimPrefix(sc.adminURL, "http://")

	var out bytes.Buffer
	if err := runTenants(context.Background(), &out, tenantsFlags{address: addr}, clk.Now()); err != nil {
		t.Fatal(err)
	}
	const want = `TENANT   MODE                   EXPIRES  LAST ERROR                                REFRESH TOKEN
1234567  client_credentials     in 49m   -                                         no
1234567  account anna (user 7)  in 49m   -                                         yes (10m)
5550001  none                   -        tenant_not_authorized: no service-accou…  no
7654321  refresh_token          in 49m   -                                         yes (10m)
`
	if out.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", out.String(), want)
	}
	out.Reset()
	if err := runTenants(context.Background(), &out, tenantsFlags{address: addr, json: true}, clk.Now()); err != nil {
		t.Fatal(err)
	}
	var rows []tokens.TenantInfo
	if err := json.Unmarshal(out.Bytes(), &rows); err != nil || len(rows) != 3 {
		t.Errorf("--json: %v: %s", err, out.String())
	}
	if strings.Contains(out.String(), "eyJ") || regexpHex40.Match(out.Bytes()) {
		t.Errorf("--json printed a token: %s", out.String())
	}

	// A Caddy without a fortnox handler answers, and the error says so.
	caddyStop(t)
	err := runTenants(context.Background(), &bytes.Buffer{}, tenantsFlags{address: addr}, clk.Now())
	if err == nil || !strings.Contains(err.Error(), "refused GET /fortnox/tenants") || !strings.Contains(err.Error(), "no fortnox handler is loaded") {
		t.Errorf("a Caddy without the sidecar's config: %v", err)
	}
	// Nothing listens at the address any more (in this process the admin
	// endpoint outlives a stop, so it is turned off).
	if err := caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the admin endpoint to close", func() bool { // it closes in the background
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
		}
		return err != nil && strings.Contains(err.Error(), "refused")
	})
	err = runTenants(context.Background(), &bytes.Buffer{}, tenantsFlags{address: addr}, clk.Now())
	if err == nil {
		t.Fatal("no error with the admin endpoint gone")
	}
	for _, want := range []string{"cannot reach Caddy's admin API at " + addr + ": dial tcp", "connection refused", "Is the sidecar running?", "--address"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
}
