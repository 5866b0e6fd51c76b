package fakefortnox

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	clientA = "client-a"
	secretA = "secret-a"
	clientB = "client-b"
	secretB = "secret-b"
	tenantA = "1234567"
	tenantB = "7654321"
)

var hex40 = regexp.MustCompile(`^[0-9a-f]{40}$`)

// testClient keeps enough idle connections for the load tests and never
// follows redirects, so the authorize page's answer can be read.
var testClient = &http.Client{
	Transport: &http.Transport{MaxIdleConnsPerHost: 200},
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

func startFake(t *testing.T, opts Options) *Server {
	t.Helper()
	if opts.Clients == nil {
		opts.Clients = map[string]string{clientA: secretA, clientB: secretB}
	}
	s, err := Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

type answer struct {
	status      int
	contentType string
	header      http.Header
	body        []byte
}

// field decodes the body as JSON whatever its Content-Type and returns one
// top-level field ("" if absent).
func (a answer) field(t *testing.T, name string) any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(a.body, &m); err != nil {
		t.Fatalf("body is not JSON: %v: %s", err, a.body)
	}
	return m[name]
}

func (a answer) str(t *testing.T, name string) string {
	t.Helper()
	v, _ := a.field(t, name).(string)
	return v
}

func do(t *testing.T, req *http.Request) answer {
	t.Helper()
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return answer{resp.StatusCode, resp.Header.Get("Content-Type"), resp.Header, body}
}

// tokenReq is a token endpoint request; empty fields are left out.
type tokenReq struct {
	clientID, secret string
	tenantHeader     string
	form             url.Values
	contentType      string // default application/x-www-form-urlencoded
}

func newTokenRequest(t *testing.T, ctx context.Context, s *Server, tr tokenReq) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.TokenURL(), strings.NewReader(tr.form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	ct := tr.contentType
	if ct == "" {
		ct = "application/x-www-form-urlencoded"
	}
	req.Header.Set("Content-Type", ct)
	if tr.clientID != "" {
		req.SetBasicAuth(tr.clientID, tr.secret)
	}
	if tr.tenantHeader != "" {
		req.Header.Set("TenantId", tr.tenantHeader)
	}
	return req
}

func postToken(t *testing.T, s *Server, tr tokenReq) answer {
	t.Helper()
	return do(t, newTokenRequest(t, context.Background(), s, tr))
}

func clientCredentials(clientID, secret, tenant string) tokenReq {
	return tokenReq{clientID: clientID, secret: secret, tenantHeader: tenant,
		form: url.Values{"grant_type": {"client_credentials"}}}
}

func refreshWith(clientID, secret, refreshToken string) tokenReq {
	return tokenReq{clientID: clientID, secret: secret,
		form: url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refreshToken}}}
}

func codeExchange(clientID, secret, code, redirectURI string) tokenReq {
	return tokenReq{clientID: clientID, secret: secret,
		form: url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {redirectURI}}}
}

// accessToken gets a client-credentials token for the tenant, which must
// have a consent.
func accessToken(t *testing.T, s *Server, clientID, secret, tenant string) string {
	t.Helper()
	a := postToken(t, s, clientCredentials(clientID, secret, tenant))
	if a.status != http.StatusOK {
		t.Fatalf("client_credentials for %s: %d %s", tenant, a.status, a.body)
	}
	return a.str(t, "access_token")
}

func api(t *testing.T, s *Server, method, path, token, body string) answer {
	t.Helper()
	req, err := http.NewRequest(method, s.URL()+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("Accept", "application/json")
	return do(t, req)
}

// payload decodes a JWT's claims without checking anything.
func payload(t *testing.T, token string) map[string]any {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %q", token)
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestClientCredentials(t *testing.T) {
	tests := []struct {
		name        string
		setup       func(s *Server)
		req         tokenReq
		wantStatus  int
		wantType    string
		wantError   string // OAuth error code, "" for success or non-OAuth bodies
		wantNoOAuth bool   // the body is not OAuth JSON
	}{
		{
			name:       "consent gives a token",
			setup:      func(s *Server) { s.GrantConsent(clientA, tenantA) },
			req:        clientCredentials(clientA, secretA, tenantA),
			wantStatus: http.StatusOK,
			wantType:   "application/json",
		},
		{
			name:       "no consent: default answer",
			req:        clientCredentials(clientA, secretA, tenantA),
			wantStatus: http.StatusBadRequest,
			wantType:   "application/json",
			wantError:  "unauthorized_client",
		},
		{
			name:       "consent of another client does not count",
			setup:      func(s *Server) { s.GrantConsent(clientB, tenantA) },
			req:        clientCredentials(clientA, secretA, tenantA),
			wantStatus: http.StatusBadRequest,
			wantType:   "application/json",
			wantError:  "unauthorized_client",
		},
		{
			name: "revoked consent",
			setup: func(s *Server) {
				s.GrantConsent(clientA, tenantA)
				s.RevokeConsent(clientA, tenantA)
			},
			req:        clientCredentials(clientA, secretA, tenantA),
			wantStatus: http.StatusBadRequest,
			wantType:   "application/json",
			wantError:  "unauthorized_client",
		},
		{
			name:       "no consent: configured answer",
			setup:      func(s *Server) { s.SetNoConsentAnswer(http.StatusForbidden, "access_denied") },
			req:        clientCredentials(clientA, secretA, tenantA),
			wantStatus: http.StatusForbidden,
			wantType:   "application/json",
			wantError:  "access_denied",
		},
		{
			name:        "no consent: configured non-OAuth answer",
			setup:       func(s *Server) { s.SetNoConsentAnswer(http.StatusUnauthorized, "") },
			req:         clientCredentials(clientA, secretA, tenantA),
			wantStatus:  http.StatusUnauthorized,
			wantType:    "text/plain",
			wantNoOAuth: true,
		},
		{
			name:       "TenantId header missing",
			setup:      func(s *Server) { s.GrantConsent(clientA, tenantA) },
			req:        clientCredentials(clientA, secretA, ""),
			wantStatus: http.StatusBadRequest,
			wantType:   "application/json",
			wantError:  "invalid_request",
		},
		{
			name:       "TenantId header not digits",
			req:        clientCredentials(clientA, secretA, "acme"),
			wantStatus: http.StatusBadRequest,
			wantType:   "application/json",
			wantError:  "invalid_request",
		},
		{
			name:       "wrong secret",
			setup:      func(s *Server) { s.GrantConsent(clientA, tenantA) },
			req:        clientCredentials(clientA, "nope", tenantA),
			wantStatus: http.StatusUnauthorized,
			wantType:   "text/plain",
			wantError:  "invalid_client",
		},
		{
			name:       "unknown client",
			req:        clientCredentials("stranger", secretA, tenantA),
			wantStatus: http.StatusUnauthorized,
			wantType:   "text/plain",
			wantError:  "invalid_client",
		},
		{
			name:       "no Basic auth",
			setup:      func(s *Server) { s.GrantConsent(clientA, tenantA) },
			req:        clientCredentials("", "", tenantA),
			wantStatus: http.StatusUnauthorized,
			wantType:   "text/plain",
			wantError:  "invalid_client",
		},
		{
			name:  "credentials in the body are not client authentication",
			setup: func(s *Server) { s.GrantConsent(clientA, tenantA) },
			req: tokenReq{tenantHeader: tenantA, form: url.Values{
				"grant_type": {"client_credentials"}, "client_id": {clientA}, "client_secret": {secretA}}},
			wantStatus: http.StatusUnauthorized,
			wantType:   "text/plain",
			wantError:  "invalid_client",
		},
		{
			name:  "body that is not a form",
			setup: func(s *Server) { s.GrantConsent(clientA, tenantA) },
			req: tokenReq{clientID: clientA, secret: secretA, tenantHeader: tenantA, contentType: "application/json",
				form: url.Values{"grant_type": {"client_credentials"}}},
			wantStatus: http.StatusBadRequest,
			wantType:   "application/json",
			wantError:  "invalid_request",
		},
		{
			name:       "unsupported grant",
			req:        tokenReq{clientID: clientA, secret: secretA, form: url.Values{"grant_type": {"password"}}},
			wantStatus: http.StatusBadRequest,
			wantType:   "application/json",
			wantError:  "unsupported_grant_type",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startFake(t, Options{})
			if tt.setup != nil {
				tt.setup(s)
			}
			a := postToken(t, s, tt.req)
			if a.status != tt.wantStatus || a.contentType != tt.wantType {
				t.Fatalf("got %d %q %s, want %d %q", a.status, a.contentType, a.body, tt.wantStatus, tt.wantType)
			}
			if got := s.TokenRequests("", ""); got != 1 {
				t.Errorf("TokenRequests = %d, want 1", got)
			}
			switch {
			case tt.wantNoOAuth:
				if json.Valid(a.body) {
					t.Errorf("body %s is JSON, want something else", a.body)
				}
				if got := s.TokenErrors(""); got != 0 {
					t.Errorf("TokenErrors = %d, want 0", got)
				}
			case tt.wantError != "":
				if got := a.str(t, "error"); got != tt.wantError {
					t.Errorf("error = %q, want %q", got, tt.wantError)
				}
				if a.str(t, "error_description") == "" {
					t.Error("no error_description")
				}
				if got := s.TokenErrors(tt.wantError); got != 1 {
					t.Errorf("TokenErrors(%q) = %d, want 1", tt.wantError, got)
				}
			default:
				if got := a.str(t, "token_type"); got != "bearer" {
					t.Errorf("token_type = %q", got)
				}
				if got := a.field(t, "expires_in"); got != float64(3600) {
					t.Errorf("expires_in = %v", got)
				}
				if !strings.HasPrefix(a.str(t, "scope"), "companyinformation settings ") {
					t.Errorf("scope = %q", a.str(t, "scope"))
				}
				if a.field(t, "refresh_token") != nil {
					t.Error("client_credentials answered a refresh_token")
				}
				if got := s.TokenRequests("client_credentials", tenantA); got != 1 {
					t.Errorf("TokenRequests(client_credentials, %s) = %d, want 1", tenantA, got)
				}
				if got := s.TokenErrors(""); got != 0 {
					t.Errorf("TokenErrors = %d, want 0", got)
				}
			}
		})
	}
}

func TestFormEncodedBasicAuth(t *testing.T) {
	// RFC 6749 clients such as x/oauth2 form-encode the id and secret
	// before Basic auth.
	s := startFake(t, Options{Clients: map[string]string{"id with space": "s&cret/+"}})
	s.GrantConsent("id with space", tenantA)
	for _, tr := range []tokenReq{
		clientCredentials("id with space", "s&cret/+", tenantA),
		clientCredentials(url.QueryEscape("id with space"), url.QueryEscape("s&cret/+"), tenantA),
	} {
		if a := postToken(t, s, tr); a.status != http.StatusOK {
			t.Errorf("%q: %d %s", tr.clientID, a.status, a.body)
		}
	}
}

func TestAccessTokenClaims(t *testing.T) {
	s := startFake(t, Options{TokenLifetime: 20 * time.Minute})
	s.GrantConsent(clientA, tenantA)
	service := accessToken(t, s, clientA, secretA, tenantA)
	other := accessToken(t, s, clientA, secretA, tenantA)

	a := postToken(t, s, refreshWith(clientA, secretA, s.IssueRefreshToken(clientA, tenantB)))
	if a.status != http.StatusOK {
		t.Fatalf("refresh: %d %s", a.status, a.body)
	}
	user := a.str(t, "access_token")

	if len(service) < 2500 || len(service) > 3500 {
		t.Errorf("token length %d, want about 3 KB", len(service))
	}
	cs, cu := payload(t, service), payload(t, user)
	for name, want := range map[string]any{
		"tenantId": json.Number(tenantA), "clientId": clientA, "aud": clientA, "sub": "@" + tenantA,
		"authsource": "OAUTH2", "iss": "https://api.fortnox.se/oauth2",
	} {
		if cs[name] != want {
			t.Errorf("client-credentials claim %s = %#v, want %#v", name, cs[name], want)
		}
	}
	if _, ok := cs["userId"]; ok {
		t.Error("client-credentials token has a userId")
	}
	if cu["userId"] != "1" || cu["sub"] != "1@"+tenantB || cu["tenantId"] != json.Number(tenantB) {
		t.Errorf("refresh token claims: userId %v sub %v tenantId %v", cu["userId"], cu["sub"], cu["tenantId"])
	}
	iat, _ := cs["iat"].(json.Number).Int64()
	exp, _ := cs["exp"].(json.Number).Int64()
	if exp-iat != 1200 {
		t.Errorf("exp-iat = %d, want 1200", exp-iat)
	}
	if scopes, ok := cs["scopes"].([]any); !ok || len(scopes) == 0 || scopes[0] != "companyinformation" {
		t.Errorf("scopes = %v", cs["scopes"])
	}
	if scope, ok := cs["scope"].(string); !ok || !strings.Contains(scope, "settings") {
		t.Errorf("scope = %v", cs["scope"])
	}
	if cs["jti"] == "" || cs["jti"] == payload(t, other)["jti"] {
		t.Errorf("jti %v is not unique", cs["jti"])
	}
}

func TestRefreshTokenRotation(t *testing.T) {
	s := startFake(t, Options{})
	first := s.IssueRefreshToken(clientA, tenantA)
	if !hex40.MatchString(first) {
		t.Fatalf("refresh token %q is not 40 hex characters", first)
	}

	a := postToken(t, s, refreshWith(clientA, secretA, first))
	if a.status != http.StatusOK || a.contentType != "application/json" {
		t.Fatalf("first use: %d %q %s", a.status, a.contentType, a.body)
	}
	second := a.str(t, "refresh_token")
	if !hex40.MatchString(second) || second == first {
		t.Fatalf("new refresh token %q", second)
	}
	if a.str(t, "token_type") != "bearer" || a.field(t, "expires_in") != float64(3600) || a.str(t, "scope") == "" {
		t.Errorf("answer lacks token_type, expires_in or scope: %s", a.body)
	}
	if s.RefreshTokenValid(first) || !s.RefreshTokenValid(second) {
		t.Error("RefreshTokenValid does not follow the rotation")
	}

	again := postToken(t, s, refreshWith(clientA, secretA, first))
	if again.status != http.StatusBadRequest || again.contentType != "text/html" ||
		again.str(t, "error") != "invalid_grant" || again.str(t, "error_description") != "Invalid refresh token" {
		t.Fatalf("second use: %d %q %s", again.status, again.contentType, again.body)
	}

	if a := postToken(t, s, refreshWith(clientB, secretB, second)); a.status != http.StatusBadRequest {
		t.Errorf("another client's refresh token: %d %s", a.status, a.body)
	}
	if a := postToken(t, s, refreshWith(clientA, secretA, second)); a.status != http.StatusOK {
		t.Errorf("the new token after a foreign attempt: %d %s", a.status, a.body)
	}

	// The dead token's tenant is unknown, so that request counts under "".
	if got := s.TokenRequests("refresh_token", tenantA); got != 3 {
		t.Errorf("TokenRequests(refresh_token, %s) = %d, want 3", tenantA, got)
	}
	if got := s.TokenRequests("refresh_token", ""); got != 4 {
		t.Errorf("TokenRequests(refresh_token, any) = %d, want 4", got)
	}
	if got := s.TokenErrors("invalid_grant"); got != 2 {
		t.Errorf("TokenErrors(invalid_grant) = %d, want 2", got)
	}
}

func TestRefreshTokenDeath(t *testing.T) {
	tests := []struct {
		name string
		kill func(t *testing.T, s *Server, token string)
	}{
		{"unknown", func(*testing.T, *Server, string) {}},
		{"expired after 45 days", func(_ *testing.T, s *Server, _ string) { s.Advance(45*24*time.Hour + time.Second) }},
		{"revoked", func(t *testing.T, s *Server, token string) {
			req, _ := http.NewRequest(http.MethodPost, s.URL()+"/oauth-v1/revoke",
				strings.NewReader(url.Values{"token_type_hint": {"refresh_token"}, "token": {token}}.Encode()))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.SetBasicAuth(clientA, secretA)
			a := do(t, req)
			if a.status != http.StatusOK || a.field(t, "revoked") != true {
				t.Fatalf("revoke: %d %s", a.status, a.body)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startFake(t, Options{})
			token := s.IssueRefreshToken(clientA, tenantA)
			if tt.name == "unknown" {
				token = strings.Repeat("ab", 20)
			}
			tt.kill(t, s, token)
			a := postToken(t, s, refreshWith(clientA, secretA, token))
			if a.status != http.StatusBadRequest || a.str(t, "error") != "invalid_grant" {
				t.Fatalf("got %d %s, want invalid_grant", a.status, a.body)
			}
		})
	}
}

func TestRefreshTokenStillValidAt44Days(t *testing.T) {
	s := startFake(t, Options{})
	token := s.IssueRefreshToken(clientA, tenantA)
	s.Advance(44 * 24 * time.Hour)
	if a := postToken(t, s, refreshWith(clientA, secretA, token)); a.status != http.StatusOK {
		t.Fatalf("got %d %s", a.status, a.body)
	}
}

// authorize calls the authorize page and returns its redirect.
func authorize(t *testing.T, s *Server, q url.Values) (int, *url.URL) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, s.URL()+"/oauth-v1/auth?"+q.Encode(), nil)
	a := do(t, req)
	if a.status != http.StatusFound {
		return a.status, nil
	}
	loc, err := url.Parse(a.header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	return a.status, loc
}

const redirectURI = "http://127.0.0.1:9999/callback?keep=1"

func authorizeQuery(extra ...string) url.Values {
	q := url.Values{
		"client_id":     {clientA},
		"redirect_uri":  {redirectURI},
		"scope":         {"companyinformation settings"},
		"state":         {"xyz"},
		"access_type":   {"offline"},
		"response_type": {"code"},
	}
	for i := 0; i+1 < len(extra); i += 2 {
		q.Set(extra[i], extra[i+1])
	}
	return q
}

func TestAuthorizationCodeFlow(t *testing.T) {
	s := startFake(t, Options{})
	s.SetAuthorizeAs(tenantB, "42")
	status, loc := authorize(t, s, authorizeQuery())
	if status != http.StatusFound {
		t.Fatalf("authorize: %d", status)
	}
	code := loc.Query().Get("code")
	if code == "" || loc.Query().Get("state") != "xyz" || loc.Query().Get("keep") != "1" ||
		!strings.HasPrefix(loc.String(), "http://127.0.0.1:9999/callback?") {
		t.Fatalf("redirect %s", loc)
	}
	if got := s.LastAuthorizeQuery().Get("access_type"); got != "offline" {
		t.Errorf("LastAuthorizeQuery access_type = %q", got)
	}

	wrongRedirect := postToken(t, s, codeExchange(clientA, secretA, code, "http://127.0.0.1:9999/other"))
	if wrongRedirect.status != http.StatusBadRequest || wrongRedirect.str(t, "error") != "invalid_grant" {
		t.Fatalf("wrong redirect_uri: %d %s", wrongRedirect.status, wrongRedirect.body)
	}
	if a := postToken(t, s, codeExchange(clientB, secretB, code, redirectURI)); a.status != http.StatusBadRequest {
		t.Fatalf("another client: %d %s", a.status, a.body)
	}

	a := postToken(t, s, codeExchange(clientA, secretA, code, redirectURI))
	if a.status != http.StatusOK {
		t.Fatalf("exchange: %d %s", a.status, a.body)
	}
	if !hex40.MatchString(a.str(t, "refresh_token")) || a.str(t, "scope") != "companyinformation settings" {
		t.Errorf("exchange answer %s", a.body)
	}
	claims := payload(t, a.str(t, "access_token"))
	if claims["tenantId"] != json.Number(tenantB) || claims["userId"] != "42" || claims["sub"] != "42@"+tenantB {
		t.Errorf("claims tenantId %v userId %v sub %v", claims["tenantId"], claims["userId"], claims["sub"])
	}
	if got := s.TokenRequests("authorization_code", tenantB); got != 3 {
		t.Errorf("TokenRequests(authorization_code, %s) = %d, want 3", tenantB, got)
	}

	reuse := postToken(t, s, codeExchange(clientA, secretA, code, redirectURI))
	if reuse.status != http.StatusBadRequest || reuse.str(t, "error") != "invalid_grant" {
		t.Fatalf("reuse: %d %s", reuse.status, reuse.body)
	}

	// A plain (user) authorization grants no service-account consent.
	if a := postToken(t, s, clientCredentials(clientA, secretA, tenantB)); a.status == http.StatusOK {
		t.Error("client_credentials works without account_type=service")
	}
}

func TestAuthorizationCodeExpires(t *testing.T) {
	s := startFake(t, Options{})
	_, loc := authorize(t, s, authorizeQuery())
	s.Advance(10*time.Minute + time.Second)
	a := postToken(t, s, codeExchange(clientA, secretA, loc.Query().Get("code"), redirectURI))
	if a.status != http.StatusBadRequest || a.str(t, "error") != "invalid_grant" {
		t.Fatalf("got %d %s", a.status, a.body)
	}
}

func TestServiceAccountAuthorization(t *testing.T) {
	s := startFake(t, Options{})
	_, loc := authorize(t, s, authorizeQuery("account_type", "service"))
	if a := postToken(t, s, clientCredentials(clientA, secretA, tenantA)); a.status == http.StatusOK {
		t.Fatal("consent before the code was exchanged")
	}
	if a := postToken(t, s, codeExchange(clientA, secretA, loc.Query().Get("code"), redirectURI)); a.status != http.StatusOK {
		t.Fatalf("exchange: %d %s", a.status, a.body)
	}
	a := postToken(t, s, clientCredentials(clientA, secretA, tenantA))
	if a.status != http.StatusOK || a.str(t, "scope") != "companyinformation settings" {
		t.Fatalf("client_credentials after a service consent: %d %s", a.status, a.body)
	}
}

func TestAuthorizePageRefusals(t *testing.T) {
	tests := []struct {
		name       string
		query      url.Values
		deny       bool
		wantStatus int
	}{
		{"unknown client", authorizeQuery("client_id", "stranger"), false, http.StatusBadRequest},
		{"wrong response_type", authorizeQuery("response_type", "token"), false, http.StatusBadRequest},
		{"no state", authorizeQuery("state", ""), false, http.StatusBadRequest},
		{"no scope", authorizeQuery("scope", ""), false, http.StatusBadRequest},
		{"no redirect_uri", authorizeQuery("redirect_uri", ""), false, http.StatusBadRequest},
		{"bad account_type", authorizeQuery("account_type", "user"), false, http.StatusBadRequest},
		{"customer refuses", authorizeQuery(), true, http.StatusFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startFake(t, Options{})
			if tt.deny {
				s.SetAuthorizeDeny("access_denied", "The user denied access")
			}
			status, loc := authorize(t, s, tt.query)
			if status != tt.wantStatus {
				t.Fatalf("status %d, want %d", status, tt.wantStatus)
			}
			if !tt.deny {
				return
			}
			q := loc.Query()
			if q.Get("error") != "access_denied" || q.Get("error_description") != "The user denied access" ||
				q.Get("state") != "xyz" || q.Has("code") {
				t.Errorf("refusal redirect %s", loc)
			}
		})
	}
}

// forge returns token with its payload changed and the signature kept.
func forge(t *testing.T, token string, change func(map[string]any)) string {
	t.Helper()
	parts := strings.Split(token, ".")
	claims := payload(t, token)
	change(claims)
	raw, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	return parts[0] + "." + base64.RawURLEncoding.EncodeToString(raw) + "." + parts[2]
}

func TestAPIAuthentication(t *testing.T) {
	tests := []struct {
		name       string
		token      func(t *testing.T, s *Server) string
		wantStatus int
		wantTenant string // tenant the answer is counted under
	}{
		{"valid", func(t *testing.T, s *Server) string {
			return accessToken(t, s, clientA, secretA, tenantA)
		}, http.StatusOK, tenantA},
		{"valid until its last second", func(t *testing.T, s *Server) string {
			tok := accessToken(t, s, clientA, secretA, tenantA)
			s.Advance(time.Hour - 2*time.Second)
			return tok
		}, http.StatusOK, tenantA},
		{"expired", func(t *testing.T, s *Server) string {
			tok := accessToken(t, s, clientA, secretA, tenantA)
			s.Advance(time.Hour)
			return tok
		}, http.StatusUnauthorized, tenantA},
		{"revoked", func(t *testing.T, s *Server) string {
			tok := accessToken(t, s, clientA, secretA, tenantA)
			s.RevokeAccessTokens(clientA, tenantA)
			return tok
		}, http.StatusUnauthorized, tenantA},
		{"minted right after a revoke", func(t *testing.T, s *Server) string {
			accessToken(t, s, clientA, secretA, tenantA)
			s.RevokeAccessTokens(clientA, tenantA)
			return accessToken(t, s, clientA, secretA, tenantA)
		}, http.StatusOK, tenantA},
		{"revoke of another tenant", func(t *testing.T, s *Server) string {
			tok := accessToken(t, s, clientA, secretA, tenantA)
			s.RevokeAccessTokens(clientA, tenantB)
			return tok
		}, http.StatusOK, tenantA},
		{"revoke of another client", func(t *testing.T, s *Server) string {
			tok := accessToken(t, s, clientA, secretA, tenantA)
			s.RevokeAccessTokens(clientB, tenantA)
			return tok
		}, http.StatusOK, tenantA},
		{"payload changed to another tenant", func(t *testing.T, s *Server) string {
			tok := accessToken(t, s, clientA, secretA, tenantA)
			return forge(t, tok, func(c map[string]any) { c["tenantId"] = json.Number(tenantB) })
		}, http.StatusUnauthorized, tenantB},
		{"signed by another server", func(t *testing.T, _ *Server) string {
			other := startFake(t, Options{})
			other.GrantConsent(clientA, tenantA)
			return accessToken(t, other, clientA, secretA, tenantA)
		}, http.StatusUnauthorized, tenantA},
		{"alg none", func(t *testing.T, s *Server) string {
			tok := accessToken(t, s, clientA, secretA, tenantA)
			parts := strings.Split(tok, ".")
			return base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`)) + "." + parts[1] + "."
		}, http.StatusUnauthorized, tenantA},
		{"not a JWT", func(*testing.T, *Server) string { return "garbage" }, http.StatusUnauthorized, ""},
		{"no token", func(*testing.T, *Server) string { return "" }, http.StatusUnauthorized, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startFake(t, Options{})
			s.GrantConsent(clientA, tenantA)
			a := api(t, s, http.MethodGet, "/3/companyinformation", tt.token(t, s), "")
			if a.status != tt.wantStatus || a.contentType != "application/json" {
				t.Fatalf("got %d %q %s, want %d", a.status, a.contentType, a.body, tt.wantStatus)
			}
			if tt.wantStatus == http.StatusUnauthorized {
				if string(a.body) != `{"message":"unauthorized"}` {
					t.Errorf("body %s", a.body)
				}
				if s.Unauthorized(tt.wantTenant) != 1 || s.Unauthorized("") != 1 || s.APICalls("") != 0 {
					t.Errorf("Unauthorized(%q) = %d, APICalls = %d", tt.wantTenant, s.Unauthorized(tt.wantTenant), s.APICalls(""))
				}
				return
			}
			if s.APICalls(tt.wantTenant) != 1 || s.Unauthorized("") != 0 {
				t.Errorf("APICalls(%q) = %d, Unauthorized = %d", tt.wantTenant, s.APICalls(tt.wantTenant), s.Unauthorized(""))
			}
		})
	}
}

func TestAddClient(t *testing.T) {
	s := startFake(t, Options{})
	s.AddClient("late", "pw")
	s.GrantConsent("late", tenantA)
	tok := accessToken(t, s, "late", "pw", tenantA)
	if a := api(t, s, http.MethodGet, "/3/companyinformation", tok, ""); a.status != http.StatusOK {
		t.Fatalf("added client: %d %s", a.status, a.body)
	}
}

func TestAPIEndpoints(t *testing.T) {
	s := startFake(t, Options{})
	s.GrantConsent(clientA, tenantA)
	tok := accessToken(t, s, clientA, secretA, tenantA)
	tests := []struct {
		method, path, body string
		want               string
	}{
		{"GET", "/3/companyinformation", "",
			`{"CompanyInformation":{"CompanyName":"Fake Company 1234567","DatabaseNumber":1234567,"OrganizationNumber":"556000-0000"}}`},
		{"GET", "/3/settings/company", "",
			`{"CompanySettings":{"Name":"Fake Company 1234567","DatabaseNumber":1234567}}`},
		{"POST", "/3/invoices?limit=5&page=2", `{"Invoice":{"CustomerNumber":"1"}}`,
			`{"Echo":{"Method":"POST","Path":"/3/invoices","Query":"limit=5\u0026page=2","TenantId":"1234567","ClientId":"client-a","Body":"{\"Invoice\":{\"CustomerNumber\":\"1\"}}"}}`},
		{"DELETE", "/3/companyinformation", "",
			`{"Echo":{"Method":"DELETE","Path":"/3/companyinformation","Query":"","TenantId":"1234567","ClientId":"client-a","Body":""}}`},
	}
	for _, tt := range tests {
		a := api(t, s, tt.method, tt.path, tok, tt.body)
		if a.status != http.StatusOK || string(a.body) != tt.want {
			t.Errorf("%s %s: %d %s\nwant %s", tt.method, tt.path, a.status, a.body, tt.want)
		}
	}

	log := s.APIRequests()
	if len(log) != len(tests) {
		t.Fatalf("log has %d requests, want %d", len(log), len(tests))
	}
	post := log[2]
	if post.Method != "POST" || post.Path != "/3/invoices" || post.RawQuery != "limit=5&page=2" ||
		string(post.Body) != tests[2].body || post.Tenant != tenantA || post.ClientID != clientA ||
		post.Status != http.StatusOK || post.Header.Get("Authorization") != "Bearer "+tok || post.At.IsZero() {
		t.Errorf("log entry %+v", post)
	}
	log[2].Header.Set("Authorization", "changed")
	log[2].Body[0] = 'X'
	if again := s.APIRequests()[2]; again.Header.Get("Authorization") == "changed" || again.Body[0] == 'X' {
		t.Error("APIRequests hands out the fake's own headers or body")
	}
}

func TestRateLimitSlidingWindow(t *testing.T) {
	s := startFake(t, Options{RateLimit: 3, RateWindow: 5 * time.Second})
	s.GrantConsent(clientA, tenantA)
	s.GrantConsent(clientA, tenantB)
	s.GrantConsent(clientB, tenantA)
	tokA := accessToken(t, s, clientA, secretA, tenantA)
	call := func(tok string) int {
		return api(t, s, http.MethodGet, "/3/companyinformation", tok, "").status
	}

	for i := range 3 {
		if got := call(tokA); got != http.StatusOK {
			t.Fatalf("request %d: %d", i+1, got)
		}
	}
	a := api(t, s, http.MethodGet, "/3/companyinformation", tokA, "")
	if a.status != http.StatusTooManyRequests || string(a.body) != `{"message":"Too Many Requests"}` ||
		a.contentType != "application/json" || a.header.Get("Retry-After") != "" {
		t.Fatalf("fourth request: %d %q %s Retry-After %q", a.status, a.contentType, a.body, a.header.Get("Retry-After"))
	}
	// A new token for the same tenant buys nothing; other tenants and
	// other clients have their own windows.
	if got := call(accessToken(t, s, clientA, secretA, tenantA)); got != http.StatusTooManyRequests {
		t.Errorf("fresh token, same tenant: %d", got)
	}
	if got := call(accessToken(t, s, clientA, secretA, tenantB)); got != http.StatusOK {
		t.Errorf("other tenant: %d", got)
	}
	if got := call(accessToken(t, s, clientB, secretB, tenantA)); got != http.StatusOK {
		t.Errorf("other client: %d", got)
	}

	// Refused requests do not count: at 2s one more is refused, yet at 5s
	// the window has room for three again.
	s.Advance(2 * time.Second)
	if got := call(tokA); got != http.StatusTooManyRequests {
		t.Errorf("at 2s: %d", got)
	}
	s.Advance(3 * time.Second)
	for i := range 3 {
		if got := call(tokA); got != http.StatusOK {
			t.Fatalf("at 5s, request %d: %d", i+1, got)
		}
	}
	if got := call(tokA); got != http.StatusTooManyRequests {
		t.Errorf("at 5s, fourth request: %d", got)
	}
	if s.TooMany(tenantA) != 4 || s.TooMany(tenantB) != 0 || s.APICalls(tenantA) != 7 {
		t.Errorf("TooMany(A) = %d, TooMany(B) = %d, APICalls(A) = %d", s.TooMany(tenantA), s.TooMany(tenantB), s.APICalls(tenantA))
	}
	// The window slides: requests spread over it only free up one by one.
	s.Advance(4 * time.Second)
	if got := call(tokA); got != http.StatusTooManyRequests {
		t.Errorf("at 9s: %d", got)
	}
}

func TestRateLimitOffAndChanged(t *testing.T) {
	s := startFake(t, Options{RateLimit: -1})
	s.GrantConsent(clientA, tenantA)
	tok := accessToken(t, s, clientA, secretA, tenantA)
	for range 40 {
		if a := api(t, s, http.MethodGet, "/3/x", tok, ""); a.status != http.StatusOK {
			t.Fatalf("rate limit off: %d", a.status)
		}
	}
	s.SetRateLimit(1, time.Minute)
	api(t, s, http.MethodGet, "/3/x", tok, "")
	if a := api(t, s, http.MethodGet, "/3/x", tok, ""); a.status != http.StatusTooManyRequests {
		t.Fatalf("after SetRateLimit(1): %d", a.status)
	}
}

func TestTokenLifetime(t *testing.T) {
	s := startFake(t, Options{})
	s.GrantConsent(clientA, tenantA)
	s.SetTokenLifetime(90 * time.Second)
	a := postToken(t, s, clientCredentials(clientA, secretA, tenantA))
	if a.field(t, "expires_in") != float64(90) {
		t.Fatalf("expires_in %v", a.field(t, "expires_in"))
	}
	tok := a.str(t, "access_token")
	// JWT times are whole seconds: a token minted at x.999s expires up to
	// a second early on the fake's clock, so check a second inside.
	s.Advance(88 * time.Second)
	if got := api(t, s, http.MethodGet, "/3/x", tok, "").status; got != http.StatusOK {
		t.Errorf("at 88s: %d", got)
	}
	s.Advance(3 * time.Second)
	if got := api(t, s, http.MethodGet, "/3/x", tok, "").status; got != http.StatusUnauthorized {
		t.Errorf("at 91s: %d", got)
	}
}

func TestFaults(t *testing.T) {
	tests := []struct {
		name       string
		fault      Fault
		wantStatus int // 0: the connection is dropped
	}{
		{"down", Fault{Down: true}, 0},
		{"500", Fault{Status: http.StatusInternalServerError}, http.StatusInternalServerError},
		{"503", Fault{Status: http.StatusServiceUnavailable}, http.StatusServiceUnavailable},
		{"429", Fault{Status: http.StatusTooManyRequests}, http.StatusTooManyRequests},
		{"short delay, then an answer", Fault{Delay: 50 * time.Millisecond}, http.StatusOK},
		{"delay then down", Fault{Delay: 20 * time.Millisecond, Down: true}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startFake(t, Options{})
			s.GrantConsent(clientA, tenantA)
			tok := accessToken(t, s, clientA, secretA, tenantA)
			s.Reset()
			s.SetFault(tt.fault)

			start := time.Now()
			resp, err := testClient.Do(newTokenRequest(t, context.Background(), s, clientCredentials(clientA, secretA, tenantA)))
			elapsed := time.Since(start)
			if tt.wantStatus == 0 {
				if err == nil {
					resp.Body.Close()
					t.Fatalf("got an answer %d, want a dropped connection", resp.StatusCode)
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != tt.wantStatus || len(body) == 0 {
					t.Fatalf("got %d %q, want %d", resp.StatusCode, body, tt.wantStatus)
				}
			}
			if elapsed < tt.fault.Delay {
				t.Errorf("answered after %v, want at least %v", elapsed, tt.fault.Delay)
			}
			if got := s.TokenRequests("client_credentials", tenantA); got != 1 {
				t.Errorf("TokenRequests = %d, want 1", got)
			}
			if got := s.TokenErrors(""); got != 0 {
				t.Errorf("TokenErrors = %d, want 0 for a fault", got)
			}
			// The API is never faulty.
			if a := api(t, s, http.MethodGet, "/3/companyinformation", tok, ""); a.status != http.StatusOK {
				t.Errorf("API during the fault: %d", a.status)
			}
			s.ClearFault()
			if a := postToken(t, s, clientCredentials(clientA, secretA, tenantA)); a.status != http.StatusOK {
				t.Errorf("after ClearFault: %d %s", a.status, a.body)
			}
		})
	}
}

func TestDelayRespectsCancelledClient(t *testing.T) {
	s := startFake(t, Options{})
	s.GrantConsent(clientA, tenantA)
	s.SetFault(Fault{Delay: time.Minute})

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := testClient.Do(newTokenRequest(t, ctx, s, clientCredentials(clientA, secretA, tenantA)))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the client's deadline", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("the client waited for the delay")
	}
	// The handler gives up when the client leaves: nothing stays in flight.
	deadline := time.Now().Add(5 * time.Second)
	for s.stats.snapshotInFlight() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the delayed handler is still running after its client left")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (st *stats) snapshotInFlight() int {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.inFlight
}

func TestMaxConcurrentTokenRequests(t *testing.T) {
	s := startFake(t, Options{})
	s.GrantConsent(clientA, tenantA)
	s.SetFault(Fault{Delay: 200 * time.Millisecond})
	const n = 8
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			resp, err := testClient.Do(newTokenRequest(t, context.Background(), s, clientCredentials(clientA, secretA, tenantA)))
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
		})
	}
	wg.Wait()
	if got := s.MaxConcurrentTokenRequests(); got != n {
		t.Errorf("MaxConcurrentTokenRequests = %d, want %d", got, n)
	}

	s.Reset()
	s.ClearFault()
	for range 3 {
		postToken(t, s, clientCredentials(clientA, secretA, tenantA))
	}
	if got := s.MaxConcurrentTokenRequests(); got != 1 {
		t.Errorf("after Reset and sequential requests: %d, want 1", got)
	}
}

func TestCountersAndReset(t *testing.T) {
	s := startFake(t, Options{})
	s.GrantConsent(clientA, tenantA)
	tok := accessToken(t, s, clientA, secretA, tenantA)
	postToken(t, s, clientCredentials(clientA, secretA, tenantB)) // no consent
	postToken(t, s, refreshWith(clientA, secretA, "unknown"))     // tenant unknown
	postToken(t, s, refreshWith(clientA, secretA, s.IssueRefreshToken(clientA, tenantB)))
	api(t, s, http.MethodGet, "/3/companyinformation", tok, "")
	api(t, s, http.MethodGet, "/3/companyinformation", "garbage", "")
	authorize(t, s, authorizeQuery())

	counts := []struct {
		name      string
		got, want int
	}{
		{"TokenRequests(any, any)", s.TokenRequests("", ""), 4},
		{"TokenRequests(client_credentials, any)", s.TokenRequests("client_credentials", ""), 2},
		{"TokenRequests(any, B)", s.TokenRequests("", tenantB), 2},
		{"TokenRequests(refresh_token, unknown tenant)", s.TokenRequests("refresh_token", "") - s.TokenRequests("refresh_token", tenantB), 1},
		{"TokenErrors(any)", s.TokenErrors(""), 2},
		{"TokenErrors(unauthorized_client)", s.TokenErrors("unauthorized_client"), 1},
		{"TokenErrors(invalid_grant)", s.TokenErrors("invalid_grant"), 1},
		{"APICalls(A)", s.APICalls(tenantA), 1},
		{"Unauthorized(any)", s.Unauthorized(""), 1},
		{"log", len(s.APIRequests()), 2},
	}
	for _, c := range counts {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
	if s.LastAuthorizeQuery() == nil {
		t.Error("LastAuthorizeQuery is nil")
	}

	s.Reset()
	if s.TokenRequests("", "") != 0 || s.TokenErrors("") != 0 || s.APICalls("") != 0 || s.Unauthorized("") != 0 ||
		len(s.APIRequests()) != 0 || s.LastAuthorizeQuery() != nil || s.MaxConcurrentTokenRequests() != 0 {
		t.Error("Reset left a counter or the log")
	}
	// State survives: the consent and the token still work.
	if a := api(t, s, http.MethodGet, "/3/x", tok, ""); a.status != http.StatusOK {
		t.Errorf("token after Reset: %d", a.status)
	}
	accessToken(t, s, clientA, secretA, tenantA)
}

func TestAPILogIsBounded(t *testing.T) {
	s := New(Options{})
	for i := range maxLogEntries + 10 {
		s.stats.recordAPIRequest(APIRequest{Path: "/3/" + string(rune('a'+i%26)), Status: 200, Tenant: tenantA})
	}
	log := s.APIRequests()
	if len(log) != maxLogEntries || log[0].Path != "/3/"+string(rune('a'+10%26)) {
		t.Fatalf("log holds %d, first %q", len(log), log[0].Path)
	}
	if s.APICalls(tenantA) != maxLogEntries+10 {
		t.Errorf("APICalls = %d: counters must not be capped", s.APICalls(tenantA))
	}

	big := make([]byte, 20<<20)
	for range 5 {
		s.stats.recordAPIRequest(APIRequest{Body: big, Status: 200})
	}
	if s.stats.logBytes > maxLogBodyBytes {
		t.Errorf("log holds %d body bytes", s.stats.logBytes)
	}
}

func TestConcurrentLoad(t *testing.T) {
	// A window of an hour so that a slow -race run stays inside it.
	s := startFake(t, Options{RateLimit: 25, RateWindow: time.Hour})
	tenants := []string{"1000001", "1000002", "1000003", "1000004"}
	for _, tenant := range tenants {
		s.GrantConsent(clientA, tenant)
	}
	tokens := make([]string, len(tenants))
	for i, tenant := range tenants {
		tokens[i] = accessToken(t, s, clientA, secretA, tenant)
	}
	s.Reset()

	// 240 API calls (60 per tenant) and 60 token requests at once: each
	// tenant gets exactly 25 through in the window, the rest 429.
	var wg sync.WaitGroup
	for i := range 240 {
		wg.Go(func() {
			req, _ := http.NewRequest(http.MethodPost, s.URL()+"/3/orders", strings.NewReader("x"))
			req.Header.Set("Authorization", "Bearer "+tokens[i%len(tokens)])
			resp, err := testClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		})
	}
	for i := range 60 {
		wg.Go(func() {
			tenant := tenants[i%len(tenants)]
			resp, err := testClient.Do(newTokenRequest(t, context.Background(), s, clientCredentials(clientA, secretA, tenant)))
			if err != nil {
				t.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		})
	}
	wg.Add(1)
	go func() { // readers and switches race with the traffic
		defer wg.Done()
		for range 20 {
			s.APIRequests()
			s.TokenRequests("", "")
			s.TokenRequestLog()
			s.RefreshTokenUses("x")
			s.LiveRefreshTokens(clientA, tenants[0], "")
			s.Revocations()
			s.Advance(0)
			s.SetTokenLifetime(time.Hour)
			s.SetOmitTenantClaim(false)
			s.SetTenantFault("999", Fault{})
			s.MisbindClientCredentials(clientA, "999", "")
		}
	}()
	wg.Wait()

	for _, tenant := range tenants {
		if s.APICalls(tenant) != 25 || s.TooMany(tenant) != 35 {
			t.Errorf("tenant %s: %d calls, %d too many; want 25 and 35", tenant, s.APICalls(tenant), s.TooMany(tenant))
		}
	}
	if s.TokenRequests("client_credentials", "") != 60 || s.TokenErrors("") != 0 {
		t.Errorf("TokenRequests = %d, TokenErrors = %d", s.TokenRequests("client_credentials", ""), s.TokenErrors(""))
	}
	if len(s.APIRequests()) != 240 || len(s.TokenRequestLog()) != 60 {
		t.Errorf("logs hold %d API and %d token requests", len(s.APIRequests()), len(s.TokenRequestLog()))
	}
}

func TestClock(t *testing.T) {
	s := New(Options{})
	before := s.Now()
	s.Advance(time.Hour)
	if d := s.Now().Sub(before); d < time.Hour || d > time.Hour+time.Minute {
		t.Errorf("Now moved %v, want about 1h", d)
	}
}

func TestWorksAsHandlerInHTTPTest(t *testing.T) {
	s := New(Options{Clients: map[string]string{clientA: secretA}})
	s.GrantConsent(clientA, tenantA)
	ts := httptest.NewServer(s)
	defer ts.Close()
	if s.URL() != "" {
		t.Errorf("URL() = %q for a fake that does not listen itself", s.URL())
	}
	req, _ := http.NewRequest(http.MethodPost, ts.URL+"/oauth-v1/token", strings.NewReader("grant_type=client_credentials"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("TenantId", tenantA)
	req.SetBasicAuth(clientA, secretA)
	if a := do(t, req); a.status != http.StatusOK {
		t.Fatalf("got %d %s", a.status, a.body)
	}
	// Down still drops the connection without Listen.
	s.SetFault(Fault{Down: true})
	req, _ = http.NewRequest(http.MethodPost, ts.URL+"/oauth-v1/token", strings.NewReader("grant_type=client_credentials"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if resp, err := testClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("got %d, want a dropped connection", resp.StatusCode)
	}
}

func TestRoutes(t *testing.T) {
	s := startFake(t, Options{})
	for _, c := range []struct {
		method, path string
		want         int
	}{
		{http.MethodGet, "/oauth-v1/token", http.StatusMethodNotAllowed},
		{http.MethodPost, "/oauth-v1/auth", http.StatusMethodNotAllowed},
		{http.MethodGet, "/nothing", http.StatusNotFound},
	} {
		req, _ := http.NewRequest(c.method, s.URL()+c.path, nil)
		if a := do(t, req); a.status != c.want {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, a.status, c.want)
		}
	}
	if err := s.Listen("127.0.0.1:0"); err == nil {
		t.Error("a second Listen succeeded")
	}
}

func TestSpentRefreshTokenReuseIsCountedAndMayKillTheChain(t *testing.T) {
	s := startFake(t, Options{})
	unknown := postToken(t, s, refreshWith(clientA, secretA, strings.Repeat("a", 40)))
	if unknown.status != http.StatusBadRequest || s.SpentRefreshTokenReuses() != 0 {
		t.Fatalf("an unknown token: %d, reuses %d (want 400, 0)", unknown.status, s.SpentRefreshTokenReuses())
	}
	first := s.IssueRefreshToken(clientA, tenantA)
	second := postToken(t, s, refreshWith(clientA, secretA, first)).str(t, "refresh_token")
	if s.SpentRefreshTokenReuses() != 0 {
		t.Fatal("a first use counted as a reuse")
	}
	postToken(t, s, refreshWith(clientA, secretA, first))
	if got := s.SpentRefreshTokenReuses(); got != 1 {
		t.Fatalf("reuses = %d after the spent token came back, want 1", got)
	}
	if !s.RefreshTokenValid(second) {
		t.Fatal("the chain died without SetRevokeChainOnReuse")
	}

	s.SetRevokeChainOnReuse(true)
	third := postToken(t, s, refreshWith(clientA, secretA, second)).str(t, "refresh_token")
	other := s.IssueRefreshToken(clientA, tenantB)
	postToken(t, s, refreshWith(clientA, secretA, first))
	if s.RefreshTokenValid(third) {
		t.Error("the live token of a chain whose spent token came back still works")
	}
	if !s.RefreshTokenValid(other) {
		t.Error("another chain died with it")
	}
	if got := s.SpentRefreshTokenReuses(); got != 2 {
		t.Errorf("reuses = %d, want 2", got)
	}
	s.Reset()
	if s.SpentRefreshTokenReuses() != 0 {
		t.Error("Reset kept the reuse count")
	}
}
