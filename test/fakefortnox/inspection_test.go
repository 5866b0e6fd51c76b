package fakefortnox

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// chunkedAPIRequest sends a chunked POST to /3/orders with the given
// trailers and returns the fake's log entry for it.
func chunkedAPIRequest(t *testing.T, s *Server, token string, trailer http.Header) APIRequest {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, s.URL()+"/3/orders", io.MultiReader(strings.NewReader(`{"Order":`), strings.NewReader(`{}}`)))
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = -1 // chunked: the only HTTP/1.1 framing that carries trailers
	req.Header.Set("Authorization", "Bearer "+token)
	req.Trailer = trailer
	if a := do(t, req); a.status != http.StatusOK {
		t.Fatalf("chunked request: %d %s", a.status, a.body)
	}
	log := s.APIRequests()
	return log[len(log)-1]
}

func TestAPIRequestTrailers(t *testing.T) {
	s := startFake(t, Options{})
	s.GrantConsent(clientA, tenantA)
	tok := accessToken(t, s, clientA, secretA, tenantA)

	got := chunkedAPIRequest(t, s, tok, http.Header{
		"Authorization":    {"Bearer smuggled"},
		"X-Fortnox-Tenant": {tenantB},
	})
	if got.Trailer.Get("Authorization") != "Bearer smuggled" || got.Trailer.Get("X-Fortnox-Tenant") != tenantB || len(got.Trailer) != 2 {
		t.Errorf("Trailer = %v", got.Trailer)
	}
	if string(got.Body) != `{"Order":{}}` || got.Header.Get("Authorization") != "Bearer "+tok || got.Header.Get("X-Fortnox-Tenant") != "" {
		t.Errorf("body %q, headers %v", got.Body, got.Header)
	}

	// Announced but never sent is not received.
	if got := chunkedAPIRequest(t, s, tok, http.Header{"X-Fortnox-Tenant": nil}); got.Trailer != nil {
		t.Errorf("announced-only trailer: Trailer = %v, want nil", got.Trailer)
	}
	if got := chunkedAPIRequest(t, s, tok, nil); got.Trailer != nil {
		t.Errorf("no trailers: Trailer = %v, want nil", got.Trailer)
	}
	api(t, s, http.MethodGet, "/3/companyinformation", tok, "")
	log := s.APIRequests()
	if log[len(log)-1].Trailer != nil {
		t.Errorf("plain request: Trailer = %v", log[len(log)-1].Trailer)
	}

	// APIRequests hands out copies.
	log[0].Trailer.Set("X-Fortnox-Tenant", "changed")
	if s.APIRequests()[0].Trailer.Get("X-Fortnox-Tenant") != tenantB {
		t.Error("APIRequests hands out the fake's own trailers")
	}
}

func TestTokenRequestLog(t *testing.T) {
	s := startFake(t, Options{})
	s.GrantConsent(clientA, tenantA)
	s.Advance(24 * time.Hour)
	start := time.Now().Add(24 * time.Hour)
	refresh := s.IssueUserRefreshToken(clientA, tenantB, "alice")
	s.SetAuthorizeAs(tenantB, "42")
	_, loc := authorize(t, s, authorizeQuery())

	bodyAuth := tokenReq{tenantHeader: tenantA, form: url.Values{
		"grant_type": {"client_credentials"}, "client_id": {clientA}, "client_secret": {secretA}}}
	bothAuth := clientCredentials(clientA, secretA, tenantA)
	bothAuth.form = url.Values{"grant_type": {"client_credentials"}, "client_id": {clientA}}

	postToken(t, s, clientCredentials(clientA, secretA, tenantA))
	postToken(t, s, bodyAuth)
	postToken(t, s, bothAuth)
	postToken(t, s, clientCredentials("", "", tenantA))
	postToken(t, s, refreshWith(clientA, secretA, refresh))
	postToken(t, s, refreshWith(clientA, secretA, refresh)) // used up: its owner is unknown now
	postToken(t, s, codeExchange(clientA, secretA, loc.Query().Get("code"), redirectURI))
	s.SetFault(Fault{Status: http.StatusServiceUnavailable})
	postToken(t, s, clientCredentials(clientA, secretA, tenantA))
	s.SetFault(Fault{Down: true})
	if resp, err := testClient.Do(newTokenRequest(t, context.Background(), s, clientCredentials(clientA, secretA, tenantB))); err == nil {
		resp.Body.Close()
		t.Fatal("Down answered")
	}
	s.ClearFault()

	want := []TokenRequest{
		{Grant: "client_credentials", TenantHeader: tenantA, Tenant: tenantA, ClientAuth: "basic", Status: 200},
		{Grant: "client_credentials", TenantHeader: tenantA, Tenant: tenantA, ClientAuth: "body", Status: 401},
		{Grant: "client_credentials", TenantHeader: tenantA, Tenant: tenantA, ClientAuth: "both", Status: 200},
		{Grant: "client_credentials", TenantHeader: tenantA, Tenant: tenantA, ClientAuth: "none", Status: 401},
		{Grant: "refresh_token", Tenant: tenantB, User: "alice", ClientAuth: "basic", RefreshToken: refresh, Status: 200},
		{Grant: "refresh_token", ClientAuth: "basic", RefreshToken: refresh, Status: 400},
		{Grant: "authorization_code", Tenant: tenantB, User: "42", ClientAuth: "basic", Status: 200},
		{Grant: "client_credentials", TenantHeader: tenantA, Tenant: tenantA, ClientAuth: "basic", Status: 503},
		{Grant: "client_credentials", TenantHeader: tenantB, Tenant: tenantB, ClientAuth: "basic", Status: 0},
	}
	log := s.TokenRequestLog()
	if len(log) != len(want) {
		t.Fatalf("log has %d entries, want %d: %+v", len(log), len(want), log)
	}
	for i, got := range log {
		if got.At.Before(start) || got.At.After(s.Now()) {
			t.Errorf("entry %d: At %v is not on the fake clock", i, got.At)
		}
		got.At = time.Time{}
		if got != want[i] {
			t.Errorf("entry %d:\n got %+v\nwant %+v", i, got, want[i])
		}
	}

	if got := s.RefreshTokenUses(refresh); got != 2 {
		t.Errorf("RefreshTokenUses = %d, want 2", got)
	}
	if got := s.RefreshTokenUses("never-sent"); got != 0 {
		t.Errorf("RefreshTokenUses(never sent) = %d", got)
	}

	s.Reset()
	if len(s.TokenRequestLog()) != 0 || s.RefreshTokenUses(refresh) != 0 {
		t.Error("Reset left the token log or the use counts")
	}
}

func TestTokenRequestLogIsBounded(t *testing.T) {
	s := New(Options{})
	for i := range maxLogEntries + 10 {
		s.stats.recordTokenRequest(TokenRequest{Status: i})
	}
	log := s.TokenRequestLog()
	if len(log) != maxLogEntries || log[0].Status != 10 || log[len(log)-1].Status != maxLogEntries+9 {
		t.Fatalf("log holds %d, first %d, last %d", len(log), log[0].Status, log[len(log)-1].Status)
	}
}

func revoke(t *testing.T, s *Server, clientID, secret string, form url.Values) answer {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, s.URL()+"/oauth-v1/revoke", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(clientID, secret)
	return do(t, req)
}

func TestRevocations(t *testing.T) {
	s := startFake(t, Options{})
	withHint := s.IssueRefreshToken(clientA, tenantA)
	noHint := s.IssueRefreshToken(clientA, tenantA)
	foreign := s.IssueRefreshToken(clientB, tenantA)
	wrongHint := s.IssueRefreshToken(clientA, tenantB)

	ok := func(a answer) bool { return a.status == http.StatusOK && a.field(t, "revoked") == true }
	if a := revoke(t, s, clientA, secretA, url.Values{"token_type_hint": {"refresh_token"}, "token": {withHint}}); !ok(a) {
		t.Errorf("revoke with hint: %d %s", a.status, a.body)
	}
	if a := revoke(t, s, clientA, secretA, url.Values{"token": {noHint}}); !ok(a) {
		t.Errorf("revoke without hint: %d %s", a.status, a.body)
	}
	if got := s.Revocations(); got != 2 {
		t.Errorf("Revocations = %d, want 2", got)
	}
	for _, dead := range []string{withHint, noHint} {
		a := postToken(t, s, refreshWith(clientA, secretA, dead))
		if a.status != http.StatusBadRequest || a.str(t, "error") != "invalid_grant" {
			t.Errorf("revoked token: %d %s, want invalid_grant", a.status, a.body)
		}
	}

	// Success without effect: dead, unknown and foreign tokens are not counted.
	for name, token := range map[string]string{"again": withHint, "unknown": strings.Repeat("cd", 20), "foreign": foreign} {
		if a := revoke(t, s, clientA, secretA, url.Values{"token": {token}}); !ok(a) {
			t.Errorf("%s: %d %s", name, a.status, a.body)
		}
	}
	if !s.RefreshTokenValid(foreign) {
		t.Error("a client revoked another client's refresh token")
	}

	// Only refresh tokens can be revoked.
	for _, hint := range []string{"access_token", ""} {
		a := revoke(t, s, clientA, secretA, url.Values{"token_type_hint": {hint}, "token": {wrongHint}})
		if a.status != http.StatusBadRequest || a.str(t, "error") != "unsupported_token_type" {
			t.Errorf("hint %q: %d %s, want 400 unsupported_token_type", hint, a.status, a.body)
		}
	}
	if !s.RefreshTokenValid(wrongHint) {
		t.Error("a refused revocation killed the token")
	}

	// An expired token is dead already: revoking it kills nothing.
	s.Advance(45*24*time.Hour + time.Second)
	revoke(t, s, clientA, secretA, url.Values{"token": {wrongHint}})
	if got := s.Revocations(); got != 2 {
		t.Errorf("Revocations = %d, want still 2", got)
	}
	s.Reset()
	if s.Revocations() != 0 {
		t.Error("Reset left the revocation count")
	}
}
