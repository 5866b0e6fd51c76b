package fakefortnox

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestAlways401(t *testing.T) {
	s := startFake(t, Options{RateLimit: 3, RateWindow: time.Minute})
	s.GrantConsent(clientA, tenantA)
	tok := accessToken(t, s, clientA, secretA, tenantA)

	for _, path := range []string{"/3/always-401/x", "/3/always-401", "/3/always-401/deeper/still?q=1"} {
		a := api(t, s, http.MethodGet, path, tok, "")
		if a.status != http.StatusUnauthorized || a.contentType != "application/json" ||
			string(a.body) != `{"message":"unauthorized"}` {
			t.Errorf("%s: %d %q %s, want 401 unauthorized", path, a.status, a.contentType, a.body)
		}
	}
	if got := s.Unauthorized(tenantA); got != 3 {
		t.Errorf("Unauthorized(%s) = %d, want 3", tenantA, got)
	}
	if got := s.APICalls(""); got != 0 {
		t.Errorf("APICalls = %d, want 0", got)
	}
	log := s.APIRequests()
	if len(log) != 3 || log[0].Path != "/3/always-401/x" || log[0].Status != http.StatusUnauthorized ||
		log[0].Tenant != tenantA || log[0].ClientID != clientA {
		t.Errorf("log %+v", log)
	}

	// The three 401s took the window's three turns: they reached Fortnox.
	if a := api(t, s, http.MethodGet, "/3/companyinformation", tok, ""); a.status != http.StatusTooManyRequests {
		t.Errorf("after three always-401 requests: %d, want 429", a.status)
	}
	// Over the limit, the rate limit answers first.
	if a := api(t, s, http.MethodGet, "/3/always-401/x", tok, ""); a.status != http.StatusTooManyRequests {
		t.Errorf("always-401 over the limit: %d, want 429", a.status)
	}

	// Only that path: a sibling whose name merely starts the same is normal.
	s.Advance(time.Minute)
	if a := api(t, s, http.MethodGet, "/3/always-401x", tok, ""); a.status != http.StatusOK {
		t.Errorf("/3/always-401x: %d, want 200", a.status)
	}
}

func TestMisbindClientCredentials(t *testing.T) {
	s := startFake(t, Options{})
	s.grantConsent(clientA, tenantA, []string{"companyinformation"})
	s.GrantConsent(clientA, tenantB)
	s.GrantConsent(clientB, tenantA)
	s.MisbindClientCredentials(clientA, tenantA, tenantB)

	a := postToken(t, s, clientCredentials(clientA, secretA, tenantA))
	if a.status != http.StatusOK || a.str(t, "scope") != "companyinformation" {
		t.Fatalf("misbound request: %d %s, want 200 with the asked tenant's scopes", a.status, a.body)
	}
	tok := a.str(t, "access_token")
	c := payload(t, tok)
	if c["tenantId"] != json.Number(tenantB) || c["sub"] != "@"+tenantB {
		t.Errorf("misbound token: tenantId %v sub %v, want %s", c["tenantId"], c["sub"], tenantB)
	}
	// The token really is tenant B's at the API.
	info := api(t, s, http.MethodGet, "/3/companyinformation", tok, "")
	if info.status != http.StatusOK || !strings.Contains(string(info.body), `"DatabaseNumber":`+tenantB) {
		t.Errorf("API with the misbound token: %d %s", info.status, info.body)
	}
	if s.APICalls(tenantB) != 1 || s.APICalls(tenantA) != 0 {
		t.Errorf("APICalls(B) = %d, APICalls(A) = %d", s.APICalls(tenantB), s.APICalls(tenantA))
	}
	// The request still counts under the tenant asked for.
	if got := s.TokenRequests("client_credentials", tenantA); got != 1 {
		t.Errorf("TokenRequests(client_credentials, A) = %d, want 1", got)
	}

	// Only that client and tenant are misbound.
	if got := payload(t, accessToken(t, s, clientB, secretB, tenantA))["tenantId"]; got != json.Number(tenantA) {
		t.Errorf("other client: tenantId %v", got)
	}
	if got := payload(t, accessToken(t, s, clientA, secretA, tenantB))["tenantId"]; got != json.Number(tenantB) {
		t.Errorf("other tenant: tenantId %v", got)
	}
	// The refresh grant is untouched.
	rt := postToken(t, s, refreshWith(clientA, secretA, s.IssueRefreshToken(clientA, tenantA)))
	if got := payload(t, rt.str(t, "access_token"))["tenantId"]; got != json.Number(tenantA) {
		t.Errorf("refresh grant: tenantId %v", got)
	}

	// A consent for the asked tenant is still needed.
	s.RevokeConsent(clientA, tenantA)
	if a := postToken(t, s, clientCredentials(clientA, secretA, tenantA)); a.status != http.StatusBadRequest {
		t.Errorf("misbound without consent: %d %s, want the no-consent answer", a.status, a.body)
	}
	s.GrantConsent(clientA, tenantA)

	s.MisbindClientCredentials(clientA, tenantA, "")
	if got := payload(t, accessToken(t, s, clientA, secretA, tenantA))["tenantId"]; got != json.Number(tenantA) {
		t.Errorf("after undoing: tenantId %v, want %s", got, tenantA)
	}
}

func TestOmitTenantClaim(t *testing.T) {
	s := startFake(t, Options{})
	s.GrantConsent(clientA, tenantA)
	s.SetOmitTenantClaim(true)

	service := accessToken(t, s, clientA, secretA, tenantA)
	a := postToken(t, s, refreshWith(clientA, secretA, s.IssueUserRefreshToken(clientA, tenantB, "9")))
	if a.status != http.StatusOK {
		t.Fatalf("refresh: %d %s", a.status, a.body)
	}
	user := a.str(t, "access_token")
	for name, tok := range map[string]string{"client credentials": service, "refresh": user} {
		if _, ok := payload(t, tok)["tenantId"]; ok {
			t.Errorf("%s token has a tenantId claim", name)
		}
	}
	if got := payload(t, user)["sub"]; got != "9@"+tenantB {
		t.Errorf("sub = %v, want 9@%s", got, tenantB)
	}

	// The fake still knows whose tokens they are.
	info := api(t, s, http.MethodGet, "/3/companyinformation", service, "")
	if info.status != http.StatusOK || !strings.Contains(string(info.body), `"DatabaseNumber":`+tenantA) {
		t.Errorf("service token at /3/: %d %s", info.status, info.body)
	}
	echo := api(t, s, http.MethodGet, "/3/orders", user, "")
	if echo.status != http.StatusOK || !strings.Contains(string(echo.body), `"TenantId":"`+tenantB+`"`) {
		t.Errorf("user token at /3/: %d %s", echo.status, echo.body)
	}
	if s.APICalls(tenantA) != 1 || s.APICalls(tenantB) != 1 {
		t.Errorf("APICalls(A) = %d, APICalls(B) = %d", s.APICalls(tenantA), s.APICalls(tenantB))
	}

	// Revocation and expiry still work through the server-side binding.
	s.RevokeAccessTokens(clientA, tenantA)
	if a := api(t, s, http.MethodGet, "/3/x", service, ""); a.status != http.StatusUnauthorized {
		t.Errorf("revoked claimless token: %d", a.status)
	}
	if got := s.Unauthorized(tenantA); got != 1 {
		t.Errorf("Unauthorized(A) = %d, want 1", got)
	}
	// A claimless token another server minted has no binding here.
	other := startFake(t, Options{})
	other.GrantConsent(clientA, tenantA)
	other.SetOmitTenantClaim(true)
	if a := api(t, s, http.MethodGet, "/3/x", accessToken(t, other, clientA, secretA, tenantA), ""); a.status != http.StatusUnauthorized {
		t.Errorf("foreign claimless token: %d", a.status)
	}
	s.Advance(time.Hour)
	if a := api(t, s, http.MethodGet, "/3/x", user, ""); a.status != http.StatusUnauthorized {
		t.Errorf("expired claimless token: %d", a.status)
	}

	s.SetOmitTenantClaim(false)
	if got := payload(t, accessToken(t, s, clientA, secretA, tenantA))["tenantId"]; got != json.Number(tenantA) {
		t.Errorf("after SetOmitTenantClaim(false): tenantId %v", got)
	}
}

func TestOmitTenantClaimBindingsArePruned(t *testing.T) {
	s := New(Options{})
	s.SetOmitTenantClaim(true)
	for range minBindingsPruneAt {
		s.mintAccessToken(clientA, tenantA, "", defaultScopes)
	}
	s.Advance(time.Hour)
	s.mintAccessToken(clientA, tenantB, "", defaultScopes)
	s.mu.Lock()
	n := len(s.boundTenants)
	s.mu.Unlock()
	if n != 1 {
		t.Errorf("%d bindings kept, want only the live token's", n)
	}
}

func TestUserRefreshTokenChains(t *testing.T) {
	s := startFake(t, Options{})
	alice := s.IssueUserRefreshToken(clientA, tenantA, "alice")
	s.IssueUserRefreshToken(clientA, tenantA, "bob")
	service := s.IssueRefreshToken(clientA, tenantA)
	s.IssueUserRefreshToken(clientA, tenantB, "alice")
	s.IssueUserRefreshToken(clientB, tenantA, "alice")

	live := func(user string) int { return s.LiveRefreshTokens(clientA, tenantA, user) }
	if live("alice") != 1 || live("bob") != 1 || live("1") != 1 || live("") != 3 || live("carol") != 0 {
		t.Fatalf("live chains: alice %d bob %d 1 %d any %d carol %d", live("alice"), live("bob"), live("1"), live(""), live("carol"))
	}

	// Each refresh continues alice's chain as alice.
	token := alice
	for i := range 3 {
		a := postToken(t, s, refreshWith(clientA, secretA, token))
		if a.status != http.StatusOK {
			t.Fatalf("refresh %d: %d %s", i+1, a.status, a.body)
		}
		c := payload(t, a.str(t, "access_token"))
		if c["userId"] != "alice" || c["sub"] != "alice@"+tenantA || c["tenantId"] != json.Number(tenantA) {
			t.Errorf("refresh %d: userId %v sub %v tenantId %v", i+1, c["userId"], c["sub"], c["tenantId"])
		}
		token = a.str(t, "refresh_token")
		if live("alice") != 1 || !s.RefreshTokenValid(token) {
			t.Errorf("after refresh %d: %d live alice tokens, want 1 (the new one)", i+1, live("alice"))
		}
	}
	if a := postToken(t, s, refreshWith(clientA, secretA, alice)); a.status != http.StatusBadRequest {
		t.Errorf("alice's first token again: %d", a.status)
	}

	// /3/ knows whose request it is: the log and the echo name the user,
	// and a client-credentials token names none.
	a := postToken(t, s, refreshWith(clientA, secretA, token))
	echoed := api(t, s, http.MethodGet, "/3/orders", a.str(t, "access_token"), "")
	if log := s.APIRequests(); log[len(log)-1].User != "alice" || !strings.Contains(string(echoed.body), `"UserId":"alice"`) {
		t.Errorf("alice's request: logged as user %q, echo %s", log[len(log)-1].User, echoed.body)
	}
	s.GrantConsent(clientA, tenantA)
	echoed = api(t, s, http.MethodGet, "/3/orders", accessToken(t, s, clientA, secretA, tenantA), "")
	if log := s.APIRequests(); log[len(log)-1].User != "" || strings.Contains(string(echoed.body), "UserId") {
		t.Errorf("the service account's request: logged as user %q, echo %s", log[len(log)-1].User, echoed.body)
	}

	// IssueRefreshToken is user "1", as before.
	a = postToken(t, s, refreshWith(clientA, secretA, service))
	if c := payload(t, a.str(t, "access_token")); c["userId"] != "1" || c["sub"] != "1@"+tenantA {
		t.Errorf("IssueRefreshToken chain: userId %v sub %v", c["userId"], c["sub"])
	}
	if got := payload(t, postToken(t, s, refreshWith(clientA, secretA, s.IssueUserRefreshToken(clientA, tenantB, ""))).str(t, "access_token"))["userId"]; got != "1" {
		t.Errorf("IssueUserRefreshToken with no user: userId %v, want 1", got)
	}

	// A chain whose token expires unused is lost.
	s.Advance(45*24*time.Hour + time.Second)
	if live("") != 0 {
		t.Errorf("after 45 days: %d live tokens, want 0", live(""))
	}
}

func TestUserAuthorizationGivesUserChainAndNoConsent(t *testing.T) {
	s := startFake(t, Options{})
	s.SetAuthorizeAs(tenantB, "77")
	_, loc := authorize(t, s, authorizeQuery()) // no account_type: a user's authorization
	a := postToken(t, s, codeExchange(clientA, secretA, loc.Query().Get("code"), redirectURI))
	if a.status != http.StatusOK {
		t.Fatalf("exchange: %d %s", a.status, a.body)
	}
	if c := payload(t, a.str(t, "access_token")); c["userId"] != "77" || c["sub"] != "77@"+tenantB {
		t.Errorf("code's token: userId %v sub %v", c["userId"], c["sub"])
	}
	if got := s.LiveRefreshTokens(clientA, tenantB, "77"); got != 1 {
		t.Errorf("LiveRefreshTokens(77) = %d, want 1", got)
	}
	r := postToken(t, s, refreshWith(clientA, secretA, a.str(t, "refresh_token")))
	if c := payload(t, r.str(t, "access_token")); r.status != http.StatusOK || c["userId"] != "77" {
		t.Errorf("refresh of the user's chain: %d userId %v", r.status, c["userId"])
	}
	if got := s.LiveRefreshTokens(clientA, tenantB, "77"); got != 1 {
		t.Errorf("after a refresh: LiveRefreshTokens(77) = %d, want 1", got)
	}
	if log := s.TokenRequestLog(); len(log) != 2 || log[0].User != "77" || log[1].User != "77" {
		t.Errorf("token log users: %+v", log)
	}
	cc := postToken(t, s, clientCredentials(clientA, secretA, tenantB))
	if cc.status != http.StatusBadRequest || cc.str(t, "error") != "unauthorized_client" {
		t.Errorf("client_credentials after a user's authorization: %d %s, want no consent", cc.status, cc.body)
	}
}

func TestRicherFaults(t *testing.T) {
	big := 2 << 20
	tests := []struct {
		name       string
		fault      Fault
		wantStatus int
		wantType   string
		wantBody   func(body string) bool
		wantHeader map[string]string
	}{
		{"default body unchanged", Fault{Status: http.StatusInternalServerError}, 500, "text/plain",
			func(b string) bool { return b == "fake fault: 500 Internal Server Error\n" }, nil},
		{"body and content type", Fault{Status: http.StatusBadRequest, ContentType: "text/html",
			Body: `{"error":"invalid_grant","error_description":"Invalid refresh token"}`}, 400, "text/html",
			func(b string) bool {
				return b == `{"error":"invalid_grant","error_description":"Invalid refresh token"}`
			}, nil},
		{"retry-after", Fault{Status: http.StatusTooManyRequests, RetryAfter: "7"}, 429, "text/plain",
			func(b string) bool { return b != "" }, map[string]string{"Retry-After": "7"}},
		{"redirect", Fault{Status: http.StatusFound, Location: "http://elsewhere.invalid/token"}, 302, "text/plain",
			func(string) bool { return true }, map[string]string{"Location": "http://elsewhere.invalid/token"}},
		{"2 MiB of x", Fault{Status: http.StatusServiceUnavailable, BodySize: big}, 503, "text/plain",
			func(b string) bool { return len(b) == big && strings.Trim(b, "x") == "" }, nil},
		{"JSON body padded to size", Fault{Status: http.StatusOK, ContentType: "application/json",
			Body: `{"access_token":"x"}`, BodySize: 100}, 200, "application/json",
			func(b string) bool {
				return len(b) == 100 && strings.HasPrefix(b, `{"access_token":"x"}`) && json.Valid([]byte(b))
			}, nil},
		{"body cut to size", Fault{Status: http.StatusBadGateway, Body: "0123456789", BodySize: 4}, 502, "text/plain",
			func(b string) bool { return b == "0123" }, nil},
		{"headers need a status", Fault{RetryAfter: "5", Location: "http://elsewhere.invalid/"}, 200, "application/json",
			func(b string) bool { return strings.Contains(b, "access_token") }, map[string]string{"Retry-After": "", "Location": ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startFake(t, Options{})
			s.GrantConsent(clientA, tenantA)
			s.SetFault(tt.fault)
			a := postToken(t, s, clientCredentials(clientA, secretA, tenantA))
			if a.status != tt.wantStatus || a.contentType != tt.wantType {
				t.Fatalf("got %d %q, want %d %q", a.status, a.contentType, tt.wantStatus, tt.wantType)
			}
			if !tt.wantBody(string(a.body)) {
				t.Errorf("body (%d bytes) %.200q", len(a.body), a.body)
			}
			for name, want := range tt.wantHeader {
				if got := a.header.Get(name); got != want {
					t.Errorf("%s = %q, want %q", name, got, want)
				}
			}
			if log := s.TokenRequestLog(); len(log) != 1 || log[0].Status != tt.wantStatus {
				t.Errorf("token log %+v", log)
			}
		})
	}
}

func TestTenantFault(t *testing.T) {
	s := startFake(t, Options{})
	s.GrantConsent(clientA, tenantA)
	s.GrantConsent(clientA, tenantB)
	s.SetTenantFault(tenantB, Fault{Status: http.StatusServiceUnavailable, RetryAfter: "3"})

	if a := postToken(t, s, clientCredentials(clientA, secretA, tenantA)); a.status != http.StatusOK {
		t.Errorf("client_credentials, other tenant: %d", a.status)
	}
	a := postToken(t, s, clientCredentials(clientA, secretA, tenantB))
	if a.status != http.StatusServiceUnavailable || a.header.Get("Retry-After") != "3" {
		t.Errorf("client_credentials, faulty tenant: %d Retry-After %q", a.status, a.header.Get("Retry-After"))
	}

	// The refresh grant meets the fault of the token's tenant, and the
	// refused request does not use the token up.
	rtB, rtA := s.IssueRefreshToken(clientA, tenantB), s.IssueRefreshToken(clientA, tenantA)
	if a := postToken(t, s, refreshWith(clientA, secretA, rtB)); a.status != http.StatusServiceUnavailable {
		t.Errorf("refresh, faulty tenant: %d", a.status)
	}
	if !s.RefreshTokenValid(rtB) {
		t.Error("the fault used the refresh token up")
	}
	if a := postToken(t, s, refreshWith(clientA, secretA, rtA)); a.status != http.StatusOK {
		t.Errorf("refresh, other tenant: %d", a.status)
	}

	// So does the code exchange.
	s.SetAuthorizeAs(tenantB, "5")
	_, loc := authorize(t, s, authorizeQuery())
	code := codeExchange(clientA, secretA, loc.Query().Get("code"), redirectURI)
	if a := postToken(t, s, code); a.status != http.StatusServiceUnavailable {
		t.Errorf("code exchange, faulty tenant: %d", a.status)
	}

	// Another grant with the tenant's header does not meet it.
	odd := tokenReq{clientID: clientA, secret: secretA, tenantHeader: tenantB, form: url.Values{"grant_type": {"password"}}}
	if a := postToken(t, s, odd); a.status != http.StatusBadRequest || a.str(t, "error") != "unsupported_grant_type" {
		t.Errorf("unknown grant with the tenant's header: %d %s", a.status, a.body)
	}

	// A tenant's fault replaces the global one; a zero one exempts it.
	s.SetFault(Fault{Status: http.StatusBadGateway})
	s.SetTenantFault(tenantA, Fault{})
	if a := postToken(t, s, clientCredentials(clientA, secretA, tenantA)); a.status != http.StatusOK {
		t.Errorf("exempted tenant under a global fault: %d", a.status)
	}
	if a := postToken(t, s, clientCredentials(clientA, secretA, tenantB)); a.status != http.StatusServiceUnavailable {
		t.Errorf("faulty tenant under a global fault: %d, want its own 503", a.status)
	}
	if a := postToken(t, s, refreshWith(clientA, secretA, "unknown")); a.status != http.StatusBadGateway {
		t.Errorf("unknown refresh token: %d, want the global 502", a.status)
	}
	s.ClearTenantFault(tenantB)
	if a := postToken(t, s, clientCredentials(clientA, secretA, tenantB)); a.status != http.StatusBadGateway {
		t.Errorf("after ClearTenantFault: %d, want the global 502", a.status)
	}
	s.ClearFault()
	if a := postToken(t, s, code); a.status != http.StatusOK {
		t.Errorf("code exchange after the faults: %d %s", a.status, a.body)
	}
	if a := postToken(t, s, refreshWith(clientA, secretA, rtB)); a.status != http.StatusOK {
		t.Errorf("refresh after the faults: %d %s", a.status, a.body)
	}
}
