package tokens_test

import (
	"context"
	"encoding/base64"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// tokenEndpoint is a token endpoint for tests at the wire: it answers with
// answer and records every request it gets.
type tokenEndpoint struct {
	*httptest.Server
	// clk is the clock of the clients made for this endpoint: each test
	// moves its own.
	clk      *clock.Clock
	mu       sync.Mutex
	requests []seenRequest
}

type seenRequest struct {
	url    string
	header http.Header
	body   string
}

func newTokenEndpoint(t *testing.T, answer http.HandlerFunc) *tokenEndpoint {
	t.Helper()
	e := &tokenEndpoint{clk: clock.New()}
	e.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		e.mu.Lock()
		e.requests = append(e.requests, seenRequest{url: r.URL.String(), header: r.Header.Clone(), body: string(body)})
		e.mu.Unlock()
		answer(w, r)
	}))
	t.Cleanup(e.Close)
	return e
}

func (e *tokenEndpoint) tokenURL() string { return e.URL + "/oauth-v1/token" }

func (e *tokenEndpoint) client() *tokens.Client { return tokens.NewTokenClient(e.tokenURL(), e.clk) }

func (e *tokenEndpoint) seen() []seenRequest {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]seenRequest(nil), e.requests...)
}

// answering writes status, a Content-Type and body, plus header pairs.
func answering(status int, contentType, body string, header ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		for i := 0; i+1 < len(header); i += 2 {
			w.Header().Set(header[i], header[i+1])
		}
		if contentType != "" {
			w.Header().Set("Content-Type", contentType)
		}
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}
}

var testCred = tokens.Credentials{ClientID: testClientID, ClientSecret: testClientSecret}

// A refresh token that matches the log scan's pattern, so a leak shows.
const testRefreshToken = "0123456789abcdef0123456789abcdef01234567"

func wantFailure(t *testing.T, err error, want tokens.TokenFailure) *tokens.Error {
	t.Helper()
	var terr *tokens.Error
	if !errors.As(err, &terr) {
		t.Fatalf("err = %v (%T), want a tokenError", err, err)
	}
	if terr.Failure != want {
		t.Fatalf("failure = %d (%v), want %d", terr.Failure, terr, want)
	}
	return terr
}

// Fortnox's quirks and the lifetime bounds, at the wire: each answer is
// served by a real HTTP server and read through x/oauth2.
func TestTokenAnswers(t *testing.T) {
	t.Parallel()
	jwt := fakeJWT(`{"tenantId":1,"iat":1000,"exp":1600}`)
	tests := []struct {
		name         string
		status       int
		contentType  string // default application/json
		body         string
		wantFailure  tokens.TokenFailure
		wantLifetime time.Duration
	}{
		{name: "client credentials", status: 200, body: `{"access_token":"abc","token_type":"bearer","expires_in":3600,"scope":"x"}`, wantLifetime: time.Hour},
		{name: "token type in capitals", status: 200, body: `{"access_token":"abc","token_type":"Bearer","expires_in":60}`, wantLifetime: time.Minute},
		{name: "expires_in as string", status: 200, body: `{"access_token":"abc","expires_in":"120"}`, wantLifetime: 2 * time.Minute},
		{name: "success labelled text/plain", status: 200, contentType: "text/plain", body: `{"access_token":"abc","expires_in":120}`, wantLifetime: 2 * time.Minute},
		{name: "success labelled text/html", status: 200, contentType: "text/html; charset=utf-8", body: `{"access_token":"abc","expires_in":120}`, wantLifetime: 2 * time.Minute},
		{name: "missing expires_in reads the JWT", status: 200, body: `{"access_token":"` + jwt + `"}`, wantLifetime: 600 * time.Second},
		{name: "absurd expires_in reads the JWT", status: 200, body: `{"access_token":"` + jwt + `","expires_in":99999999999}`, wantLifetime: 600 * time.Second},
		{name: "too short expires_in reads the JWT", status: 200, body: `{"access_token":"` + jwt + `","expires_in":0}`, wantLifetime: 600 * time.Second},
		{name: "negative expires_in, no JWT", status: 200, body: `{"access_token":"abc","expires_in":-5}`, wantLifetime: time.Hour},
		{name: "two days, no JWT", status: 200, body: `{"access_token":"abc","expires_in":172800}`, wantLifetime: time.Hour},
		// Stricter than the hand-written client was: x/oauth2 refuses an
		// expires_in that is not a whole number.
		{name: "fractional expires_in", status: 200, body: `{"access_token":"abc","expires_in":3600.5}`, wantFailure: tokens.FailBadAnswer},
		{name: "expires_in not a number", status: 200, body: `{"access_token":"abc","expires_in":"NaN"}`, wantFailure: tokens.FailBadAnswer},
		{name: "not bearer", status: 200, body: `{"access_token":"abc","token_type":"mac"}`, wantFailure: tokens.FailBadAnswer},
		{name: "access token with a space", status: 200, body: `{"access_token":"a b"}`, wantFailure: tokens.FailBadAnswer},
		{name: "no access token", status: 200, body: `{"token_type":"bearer"}`, wantFailure: tokens.FailBadAnswer},
		{name: "html 200", status: 200, contentType: "text/html", body: `<html>maintenance</html>`, wantFailure: tokens.FailBadAnswer},
		{name: "error in 200", status: 200, body: `{"error":"invalid_client"}`, wantFailure: tokens.FailBadClient},
		{name: "403 without body", status: 403, body: ``, wantFailure: tokens.FailNoConsent},
		{name: "500", status: 500, contentType: "text/plain", body: `oops`, wantFailure: tokens.FailUnavailable},
		{name: "429", status: 429, body: ``, wantFailure: tokens.FailUnavailable},
		{name: "redirect", status: 302, body: ``, wantFailure: tokens.FailBadAnswer},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ct := tt.contentType
			if ct == "" {
				ct = "application/json"
			}
			ep := newTokenEndpoint(t, answering(tt.status, ct, tt.body))
			a, err := ep.client().ClientCredentials(context.Background(), testCred, "1234567")
			if n := len(ep.seen()); n != 1 {
				t.Errorf("%d requests, want 1", n)
			}
			if tt.wantFailure != 0 {
				wantFailure(t, err, tt.wantFailure)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if a.Lifetime != tt.wantLifetime {
				t.Errorf("lifetime = %v, want %v", a.Lifetime, tt.wantLifetime)
			}
		})
	}
}

// Each error class comes out right whatever Content-Type Fortnox puts on
// its JSON, and from the status alone when the body is not JSON.
func TestTokenErrorClassesForEachContentType(t *testing.T) {
	t.Parallel()
	classes := []struct {
		name     string
		status   int
		body     string
		refresh  bool // ask with the refresh grant (else client credentials)
		want     tokens.TokenFailure
		wantCode string
	}{
		{name: "invalid_client", status: 401, body: `{"error":"invalid_client","error_description":"The client credentials are invalid"}`, want: tokens.FailBadClient, wantCode: "invalid_client"},
		{name: "no consent", status: 400, body: `{"error":"unauthorized_client","error_description":"no consent"}`, want: tokens.FailNoConsent, wantCode: "unauthorized_client"},
		{name: "no consent 403", status: 403, body: `{"error":"access_denied"}`, want: tokens.FailNoConsent, wantCode: "access_denied"},
		{name: "invalid_grant", status: 400, body: `{"error":"invalid_grant","error_description":"Invalid refresh token"}`, refresh: true, want: tokens.FailNoConsent, wantCode: "invalid_grant"},
		{name: "unavailable", status: 503, body: `{"error":"temporarily_unavailable"}`, want: tokens.FailUnavailable, wantCode: "temporarily_unavailable"},
		{name: "not JSON 401", status: 401, body: "Unauthorized\n", want: tokens.FailNoConsent},
		{name: "not JSON 400 refresh", status: 400, body: "<html>Bad Request</html>", refresh: true, want: tokens.FailNoConsent},
		{name: "not JSON 502", status: 502, body: "<html>Bad Gateway</html>", want: tokens.FailUnavailable},
	}
	for _, c := range classes {
		for _, ct := range []string{"application/json", "text/plain", "text/html", "text/plain; charset=utf-8", ""} {
			t.Run(c.name+"/"+ct, func(t *testing.T) {
				ep := newTokenEndpoint(t, answering(c.status, ct, c.body))
				var err error
				if c.refresh {
					_, err = ep.client().Refresh(context.Background(), testCred, testRefreshToken)
				} else {
					_, err = ep.client().ClientCredentials(context.Background(), testCred, "1234567")
				}
				terr := wantFailure(t, err, c.want)
				if terr.Code != c.wantCode {
					t.Errorf("code = %q, want %q", terr.Code, c.wantCode)
				}
				if terr.Status != c.status {
					t.Errorf("status = %d, want %d", terr.Status, c.status)
				}
				if n := len(ep.seen()); n != 1 {
					t.Errorf("%d requests, want exactly 1", n)
				}
			})
		}
	}
}

// With x/oauth2's default auth style a refused request is sent again with
// the secret in the body; pinned to the header, a no-consent answer is one
// request and a single-use refresh token is spent once.
func TestRefusedRequestIsNotSentAgain(t *testing.T) {
	t.Parallel()
	answers := map[string]http.HandlerFunc{
		"no consent":     answering(400, "application/json", `{"error":"unauthorized_client"}`),
		"invalid_client": answering(401, "text/plain", `{"error":"invalid_client"}`),
		"invalid_grant":  answering(400, "text/html", `{"error":"invalid_grant"}`),
		"500":            answering(500, "text/plain", "oops"),
		"not JSON 400":   answering(400, "text/plain", "nope"),
		"success": answering(200, "application/json",
			`{"access_token":"abc","refresh_token":"fedcba9876543210fedcba9876543210fedcba98","expires_in":3600}`),
	}
	for name, answer := range answers {
		t.Run(name, func(t *testing.T) {
			ep := newTokenEndpoint(t, answer)
			_, _ = ep.client().ClientCredentials(context.Background(), testCred, "1234567")
			if n := len(ep.seen()); n != 1 {
				t.Errorf("client credentials: %d requests, want 1", n)
			}
			ep2 := newTokenEndpoint(t, answer)
			_, _ = ep2.client().Refresh(context.Background(), testCred, testRefreshToken)
			seen := ep2.seen()
			if len(seen) != 1 {
				t.Fatalf("refresh: %d requests, want 1", len(seen))
			}
			if n := strings.Count(seen[0].body, testRefreshToken); n != 1 {
				t.Errorf("the refresh token is in the body %d times, want once: %s", n, seen[0].body)
			}
		})
	}
}

// The client id and secret only ever travel in the Basic header; Fortnox's
// headers are set, and TenantId only on client credentials.
func TestWhatEachGrantSends(t *testing.T) {
	t.Parallel()
	ep := newTokenEndpoint(t, answering(200, "application/json", `{"access_token":"abc","expires_in":3600}`))
	c := ep.client()
	ctx := context.Background()
	if _, err := c.ClientCredentials(ctx, testCred, "1234567"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Refresh(ctx, testCred, testRefreshToken); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ExchangeCode(ctx, testCred, "the-code", "https://app.example/callback"); err != nil {
		t.Fatal(err)
	}
	want := []struct {
		form   url.Values
		tenant string
	}{
		{url.Values{"grant_type": {"client_credentials"}}, "1234567"},
		{url.Values{"grant_type": {"refresh_token"}, "refresh_token": {testRefreshToken}}, ""},
		{url.Values{"grant_type": {"authorization_code"}, "code": {"the-code"}, "redirect_uri": {"https://app.example/callback"}}, ""},
	}
	seen := ep.seen()
	if len(seen) != len(want) {
		t.Fatalf("%d requests, want %d", len(seen), len(want))
	}
	basic := "Basic " + base64.StdEncoding.EncodeToString([]byte(testClientID+":"+testClientSecret))
	for i, r := range seen {
		if strings.Contains(r.body, testClientSecret) || strings.Contains(r.url, testClientSecret) || strings.Contains(r.body, "client_id") {
			t.Errorf("request %d: credentials outside the Basic header: %s %s", i, r.url, r.body)
		}
		if got := r.header.Get("Authorization"); got != basic {
			t.Errorf("request %d: Authorization = %q, want Basic id:secret", i, got)
		}
		form, err := url.ParseQuery(r.body)
		if err != nil || form.Encode() != want[i].form.Encode() {
			t.Errorf("request %d: body %q, want %q", i, r.body, want[i].form.Encode())
		}
		if got := r.header.Get("TenantId"); got != want[i].tenant {
			t.Errorf("request %d: TenantId = %q, want %q", i, got, want[i].tenant)
		}
		if r.url != "/oauth-v1/token" {
			t.Errorf("request %d: URL %q", i, r.url)
		}
		for h, v := range map[string]string{"Accept": "application/json", "User-Agent": "caddy-fortnox", "Content-Type": "application/x-www-form-urlencoded"} {
			if got := r.header.Get(h); got != v {
				t.Errorf("request %d: %s = %q, want %q", i, h, got, v)
			}
		}
	}
}

// x/oauth2 copies the refresh token sent into an answer that has none: that
// is "no new refresh token", not the old one back.
func TestRefreshAnswerWithoutNewRefreshToken(t *testing.T) {
	t.Parallel()
	ep := newTokenEndpoint(t, answering(200, "application/json", `{"access_token":"abc","expires_in":3600}`))
	a, err := ep.client().Refresh(context.Background(), testCred, testRefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	if a.RefreshToken != "" {
		t.Errorf("refreshToken = %q, want none", a.RefreshToken)
	}
	const rotated = "fedcba9876543210fedcba9876543210fedcba98"
	ep = newTokenEndpoint(t, answering(200, "text/html", `{"access_token":"abc","refresh_token":"`+rotated+`","expires_in":3600,"scope":"companyinformation"}`))
	a, err = ep.client().Refresh(context.Background(), testCred, testRefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	if a.RefreshToken != rotated || a.Scope != "companyinformation" {
		t.Errorf("refreshToken %q scope %q, want the rotated token and the scope", a.RefreshToken, a.Scope)
	}
}

// The lifetime is read from the raw expires_in, not from x/oauth2's Expiry
// (time.Now based): it is exact, however far the plugin's clock has moved.
func TestLifetimeIgnoresTheWallClock(t *testing.T) {
	t.Parallel()
	ep := newTokenEndpoint(t, answering(200, "application/json", `{"access_token":"abc","expires_in":3600}`))
	ep.clk.Advance(3 * time.Hour)
	a, err := ep.client().ClientCredentials(context.Background(), testCred, "1234567")
	if err != nil {
		t.Fatal(err)
	}
	if a.Lifetime != time.Hour {
		t.Errorf("lifetime = %v, want exactly 1h", a.Lifetime)
	}
}

// Retry-After on 429 and 5xx sets when the next attempt may be made.
func TestRetryAfterFromFortnox(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		status int
		body   string
		value  string
		want   time.Duration
	}{
		{503, "down", "30", 30 * time.Second},
		{429, `{"error":"slow_down"}`, "7", 7 * time.Second},
		{500, "", " 12 ", 12 * time.Second},
		{503, "<html>" + strings.Repeat("x", tokens.MaxTokenAnswer) + "</html>", "45", 45 * time.Second}, // over the bound: not read, still "later"
		{503, "", "Wed, 21 Oct 2015 07:28:00 GMT", 0},                                                    // dates are ignored
		{503, "", "86400", time.Hour},                                                                    // capped
	} {
		t.Run(strconv.Itoa(tt.status)+" "+strings.TrimSpace(tt.value), func(t *testing.T) {
			ep := newTokenEndpoint(t, answering(tt.status, "text/plain", tt.body, "Retry-After", tt.value))
			_, err := ep.client().ClientCredentials(context.Background(), testCred, "1234567")
			terr := wantFailure(t, err, tokens.FailUnavailable)
			if tt.want == 0 {
				if !terr.RetryAt.IsZero() {
					t.Errorf("retryAt set from %q", tt.value)
				}
				return
			}
			if got := terr.RetryAt.Sub(ep.clk.Now()); got < tt.want-time.Second || got > tt.want+time.Second {
				t.Errorf("retryAt in %v, want about %v", got, tt.want)
			}
		})
	}
}

// Answers are bounded at 64 KiB: a 2xx or 4xx over it is unusable, a 5xx
// or 429 over it is still "try later"; an answer at the bound is read.
func TestAnswerSizeBound(t *testing.T) {
	t.Parallel()
	valid := `{"access_token":"abc","expires_in":3600}`
	atBound := valid + strings.Repeat(" ", tokens.MaxTokenAnswer-len(valid))
	tests := []struct {
		name   string
		status int
		body   string
		want   tokens.TokenFailure
	}{
		{"at the bound", 200, atBound, 0},
		{"one byte over", 200, atBound + " ", tokens.FailBadAnswer},
		{"huge token", 200, `{"access_token":"` + strings.Repeat("a", tokens.MaxTokenAnswer) + `"}`, tokens.FailBadAnswer},
		{"huge 503 page", 503, "<html>" + strings.Repeat("x", tokens.MaxTokenAnswer) + "</html>", tokens.FailUnavailable},
		{"huge 429", 429, strings.Repeat(" ", tokens.MaxTokenAnswer+1), tokens.FailUnavailable},
		// Not read, so it cannot say invalid_grant: it must not mark a
		// refresh token dead.
		{"huge 400", 400, `{"error":"invalid_grant","error_description":"` + strings.Repeat("y", tokens.MaxTokenAnswer) + `"}`, tokens.FailBadAnswer},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ep := newTokenEndpoint(t, answering(tt.status, "application/json", tt.body))
			a, err := ep.client().Refresh(context.Background(), testCred, testRefreshToken)
			if tt.want == 0 {
				if err != nil || a.AccessToken != "abc" {
					t.Fatalf("answer %v, %v; want the token", a, err)
				}
				return
			}
			wantFailure(t, err, tt.want)
		})
	}
}

// Redirects are never followed: the secret would go elsewhere.
func TestNoRedirects(t *testing.T) {
	t.Parallel()
	elsewhere := newTokenEndpoint(t, answering(200, "application/json", `{"access_token":"abc","expires_in":3600}`))
	for _, status := range []int{301, 302, 307, 308} {
		ep := newTokenEndpoint(t, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, elsewhere.tokenURL(), status)
		})
		_, err := ep.client().ClientCredentials(context.Background(), testCred, "1234567")
		terr := wantFailure(t, err, tokens.FailBadAnswer)
		if terr.Status != status {
			t.Errorf("%d: status %d", status, terr.Status)
		}
	}
	if n := len(elsewhere.seen()); n != 0 {
		t.Errorf("the redirect target got %d requests", n)
	}
}

// Error texts never repeat the answer's body (which may hold a token).
func TestTokenErrorTextHasNoBody(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		status int
		body   string
	}{
		{400, `{"error":"invalid_grant","error_description":"bad","refresh_token":"rt-secret"}`},
		{500, `{"access_token":"rt-secret"}`},
		{200, `{"access_token":"rt-secret","expires_in":"soon"}`},
		{200, `{"access_token":"rt-secret","token_type":"mac"}`},
	} {
		ep := newTokenEndpoint(t, answering(tt.status, "text/plain", tt.body))
		_, err := ep.client().ClientCredentials(context.Background(), testCred, "1234567")
		if err == nil {
			t.Fatalf("%d %s: no error", tt.status, tt.body)
		}
		terr := tokens.AsTokenError(err)
		if text := err.Error() + terr.Advice("1"); strings.Contains(text, "rt-secret") {
			t.Errorf("error text repeats the body: %s", text)
		}
	}
}

// An unusable 2xx answer says what is wrong with it.
func TestUnusableAnswerSaysWhy(t *testing.T) {
	t.Parallel()
	for body, want := range map[string]string{
		`<html>maintenance</html>`:                         "not a JSON object",
		`{"token_type":"bearer"}`:                          "no access_token",
		`{"access_token":"abc","expires_in":"in an hour"}`: "expires_in is not a number",
		`{"access_token":"abc","expires_in":3600.5}`:       "whole number of seconds",
	} {
		ep := newTokenEndpoint(t, answering(200, "application/json", body))
		_, err := ep.client().ClientCredentials(context.Background(), testCred, "1234567")
		if terr := wantFailure(t, err, tokens.FailBadAnswer); !strings.Contains(terr.Error(), want) {
			t.Errorf("%s: %q does not say %q", body, terr.Error(), want)
		}
	}
}

// A request that gets no HTTP answer is "unavailable", and its text names
// the class of failure and the host, never the URL's path.
func TestTransportFailureClasses(t *testing.T) {
	t.Parallel()
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body) // so the server notices the client leave
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	}))
	defer slow.Close()
	tlsServer := httptest.NewTLSServer(answering(200, "application/json", `{"access_token":"abc"}`))
	defer tlsServer.Close()
	plain := httptest.NewServer(answering(200, "application/json", `{"access_token":"abc"}`))
	defer plain.Close()
	hangUp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
	}))
	defer hangUp.Close()
	refused := testproc.Addr(testproc.FreePort(t)) // nothing listens there

	tests := []struct {
		name     string
		url      string
		kind     tokens.TransportKind
		wantText []string
		wantHint string
	}{
		{"DNS", "https://tokens.caddy-fortnox.invalid/oauth-v1/token", tokens.TransportDNS, []string{"DNS failure", "tokens.caddy-fortnox.invalid"}, "DNS resolver"},
		{"refused", "http://" + refused + "/oauth-v1/token", tokens.TransportRefused, []string{"connection refused", refused}, "blocks the port"},
		{"timeout", slow.URL + "/oauth-v1/token", tokens.TransportTimeout, []string{"timed out", strings.TrimPrefix(slow.URL, "http://")}, "token_timeout"},
		{"TLS untrusted", tlsServer.URL + "/oauth-v1/token", tokens.TransportTLS, []string{"TLS failure", "not trusted"}, "CA certificates"},
		{"TLS to plain HTTP", strings.Replace(plain.URL, "http:", "https:", 1) + "/oauth-v1/token", tokens.TransportTLS, []string{"TLS failure", "does not speak TLS"}, "CA certificates"},
		{"hang-up", hangUp.URL + "/oauth-v1/token", tokens.TransportClosed, []string{"closed without an answer"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			budget := 10 * time.Second // only the timeout case should time out
			if tt.kind == tokens.TransportTimeout {
				budget = 300 * time.Millisecond
			}
			ctx, cancel := context.WithTimeout(context.Background(), budget)
			defer cancel()
			_, err := tokens.NewTokenClient(tt.url, clock.New()).ClientCredentials(ctx, testCred, "1234567")
			terr := wantFailure(t, err, tokens.FailUnavailable)
			var te *tokens.TransportError
			if !errors.As(terr.Cause, &te) || te.Kind != tt.kind {
				t.Fatalf("cause %v (%T), want transport failure kind %d", terr.Cause, terr.Cause, tt.kind)
			}
			advice := terr.Advice("1234567")
			for _, text := range []string{terr.Error(), advice} {
				for _, want := range tt.wantText {
					if !strings.Contains(text, want) {
						t.Errorf("%q does not say %q", text, want)
					}
				}
				if strings.Contains(text, "/oauth-v1") {
					t.Errorf("%q names the URL", text)
				}
			}
			if !strings.Contains(advice, tt.wantHint) {
				t.Errorf("advice %q lacks the hint %q", advice, tt.wantHint)
			}
		})
	}
}

func TestRefreshAheadAfter(t *testing.T) {
	t.Parallel()
	if got := tokens.RefreshAheadAfter(time.Hour, 5*time.Minute); got != 55*time.Minute {
		t.Errorf("1h token: %v", got)
	}
	if got := tokens.RefreshAheadAfter(time.Minute, 5*time.Minute); got != 30*time.Second {
		t.Errorf("1m token: %v", got)
	}
}

func TestBackoffDelayGrowsAndCaps(t *testing.T) {
	t.Parallel()
	for n, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: 4 * time.Second, 7: time.Minute, 50: time.Minute} {
		got := tokens.BackoffDelay(n)
		if got < want*8/10 || got > want*12/10 {
			t.Errorf("backoffDelay(%d) = %v, want %v ±20%%", n, got, want)
		}
	}
}

// countingBody is an answer body of n bytes that counts what is read of it.
type countingBody struct {
	left, read int
}

func (b *countingBody) Read(p []byte) (int, error) {
	if b.left == 0 {
		return 0, io.EOF
	}
	n := min(len(p), b.left)
	for i := range p[:n] {
		p[i] = ' '
	}
	b.left -= n
	b.read += n
	return n, nil
}

func (b *countingBody) Close() error { return nil }

type bodyTransport struct{ body *countingBody }

func (t bodyTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	return &http.Response{StatusCode: 200, Header: http.Header{}, Body: t.body, Request: r}, nil
}

// A huge answer is not read past the bound (x/oauth2 would read a MiB).
func TestAnswerIsNotReadPastTheBound(t *testing.T) {
	t.Parallel()
	body := &countingBody{left: 8 << 20}
	c := tokens.NewTokenClient("https://apps.fortnox.example/oauth-v1/token", clock.New())
	c.Transport = bodyTransport{body}
	_, err := c.ClientCredentials(context.Background(), testCred, "1234567")
	wantFailure(t, err, tokens.FailBadAnswer)
	if body.read > tokens.MaxTokenAnswer+1 {
		t.Errorf("read %d bytes of the answer, want at most %d", body.read, tokens.MaxTokenAnswer+1)
	}
}

// The client's tests run in parallel, each on clocks of its own; the test
// client's credentials, and unsigned JWT-shaped tokens.
const (
	testClientID     = "test-client"
	testClientSecret = "test-secret-0c1a8f3e9b"
)

// fakeJWT builds an unsigned JWT-shaped token with the given payload JSON.
func fakeJWT(payload string) string {
	enc := base64.RawURLEncoding
	return enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." + enc.EncodeToString([]byte(payload)) + ".c2lnbmF0dXJl"
}
