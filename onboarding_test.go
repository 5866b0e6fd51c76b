package fortnox

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

const testCookieSecret = "cookie-secret-for-tests-0123456789abcdef"

// connectSidecar is a sidecar with a public connect site beside it.
func connectSidecar(t *testing.T, fake *fakefortnox.Server, extra string) (*sidecar, string) {
	t.Helper()
	port := freePort(t)
	public := fmt.Sprintf("http://127.0.0.1:%d", port)
	t.Setenv("FORTNOX_TEST_COOKIE_SECRET", testCookieSecret)
	t.Setenv("FORTNOX_TEST_WEBHOOK_SECRET", "webhook-secret")
	t.Setenv("FORTNOX_TEST_LINK_KEY", testLinkKey)
	sc := startSidecar(t, fake, "")
	sc.extraSites = fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	fortnox_connect {
		client_id {env.FORTNOX_TEST_CLIENT_ID}
		token_url %s
		authorize_url %s/oauth-v1/auth
		redirect_uri %s/fortnox/callback
		scopes companyinformation invoice
		cookie_secret {env.FORTNOX_TEST_COOKIE_SECRET}
		link_key {env.FORTNOX_TEST_LINK_KEY}%s
	}
	fortnox_webhook {
		client_id {env.FORTNOX_TEST_CLIENT_ID}
		token_url %s
		secret {env.FORTNOX_TEST_WEBHOOK_SECRET}
	}
	respond "not here" 404
}
`, port, fake.TokenURL(), fake.URL(), public, indentOptions(extra), fake.TokenURL())
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	return sc, public
}

var noRedirects = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// startConnect GETs /fortnox/connect and returns the authorize URL and the
// state cookie.
func startConnect(t *testing.T, public string) (*url.URL, *http.Cookie) {
	t.Helper()
	resp, err := noRedirects.Get(public + "/fortnox/connect")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("connect: %d", resp.StatusCode)
	}
	loc, _ := url.Parse(resp.Header.Get("Location"))
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if strings.HasPrefix(c.Name, stateCookiePrefix) {
			cookie = c
		}
	}
	if cookie == nil || !cookie.HttpOnly || cookie.SameSite != http.SameSiteLaxMode || cookie.Path != "/fortnox/callback" ||
		cookie.Name != stateCookiePrefix+loc.Query().Get("state")[:16] || cookie.MaxAge != 660 {
		t.Fatalf("state cookie %+v", cookie)
	}
	return loc, cookie
}

// authorize follows the authorize URL at the fake (which approves) and
// returns the callback URL it redirects to.
func authorize(t *testing.T, loc *url.URL) string {
	t.Helper()
	resp, err := noRedirects.Get(loc.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("authorize: %d", resp.StatusCode)
	}
	return resp.Header.Get("Location")
}

// callback GETs the callback URL with cookie and, when it answers 303 to
// its result page, that page; it returns the status and page.
func callback(t *testing.T, callbackURL string, cookie *http.Cookie) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, callbackURL, nil)
	if cookie != nil {
		req.AddCookie(cookie)
	}
	resp, err := noRedirects.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusSeeOther {
		result, err := req.URL.Parse(resp.Header.Get("Location"))
		if err != nil {
			t.Fatal(err)
		}
		resp, err = noRedirects.Get(result.String())
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
	}
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// The whole connect flow: redirect parameters, state, code exchange, stored
// refresh token, then proxied requests for the new tenant.
func TestConnectFlow(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizeAs("5550001", "7")
	sc, public := connectSidecar(t, fake, "")

	loc, cookie := startConnect(t, public)
	q := loc.Query()
	for k, want := range map[string]string{
		"client_id": testClientID, "redirect_uri": public + "/fortnox/callback", "scope": "companyinformation invoice",
		"access_type": "offline", "response_type": "code", "account_type": "service",
	} {
		if q.Get(k) != want {
			t.Errorf("authorize %s = %q, want %q", k, q.Get(k), want)
		}
	}
	if len(q.Get("state")) < 40 {
		t.Errorf("state %q is too short to be random", q.Get("state"))
	}
	cb := authorize(t, loc)
	if got := fake.LastAuthorizeQuery().Get("state"); got != q.Get("state") {
		t.Errorf("Fortnox saw state %q", got)
	}
	status, body := callback(t, cb, cookie)
	if status != http.StatusOK || !strings.Contains(body, `<strong id="tenant">5550001</strong>`) {
		t.Fatalf("callback: %d %s", status, body)
	}
	for _, p := range secretPatterns {
		if p.MatchString(body) {
			t.Error("the success page holds a token")
		}
	}
	rec := sc.storedRecord("5550001")
	if !fake.RefreshTokenValid(rec.RefreshToken) {
		t.Error("the stored refresh token is not the live one")
	}
	if status, body, _ := sc.get("/3/companyinformation", "5550001"); status != http.StatusOK || companyNumber(t, body) != "5550001" {
		t.Fatalf("proxied request for the new tenant: %d %s", status, body)
	}

	// The same callback again (from history, even with the old cookie)
	// says it is done, and changes nothing.
	if status, body := callback(t, cb, cookie); status != http.StatusOK || !strings.Contains(body, "Already connected") {
		t.Errorf("replayed callback: %d %s", status, body)
	}
}

// Forged, missing or tampered state is refused, and nothing is stored.
func TestConnectRefusesBadState(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc, public := connectSidecar(t, fake, "")
	loc, cookie := startConnect(t, public)
	cb := authorize(t, loc)
	forged := strings.Replace(cb, "state="+url.QueryEscape(loc.Query().Get("state")), "state=forged", 1)
	tampered := *cookie
	// A changed first character (never the same one: a state that begins
	// with "x" would otherwise be left as it was, and accepted).
	first := "x"
	if cookie.Value[0] == 'x' {
		first = "y"
	}
	tampered.Value = first + cookie.Value[1:]
	for name, tc := range map[string]struct {
		url    string
		cookie *http.Cookie
		want   string
	}{
		"forged state":    {forged, cookie, "started in another browser"},
		"no cookie":       {cb, nil, "started in another browser"},
		"tampered cookie": {cb, &tampered, "did not match"},
	} {
		status, body := callback(t, tc.url, tc.cookie)
		if status != http.StatusBadRequest || !strings.Contains(body, tc.want) {
			t.Errorf("%s: %d %s", name, status, body)
		}
	}
	if n := fake.TokenRequests("authorization_code", ""); n != 0 {
		t.Errorf("%d code exchanges for refused callbacks", n)
	}
	if infos := sc.tenants(); len(infos) != 0 {
		t.Errorf("tenants after refused callbacks: %+v", infos)
	}
}

// Fortnox's refusal on the callback is shown, not swallowed.
func TestConnectShowsFortnoxError(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizeDeny("access_denied", "The user <b>denied</b> access")
	_, public := connectSidecar(t, fake, "")
	loc, cookie := startConnect(t, public)
	status, body := callback(t, authorize(t, loc), cookie)
	if status != http.StatusForbidden || !strings.Contains(body, "was not approved in Fortnox") || !strings.Contains(body, "The user &lt;b&gt;denied&lt;/b&gt; access") {
		t.Errorf("callback after a refusal: %d %s", status, body)
	}
}

// sendEvent POSTs a consent event, signed with secret ("" = unsigned).
func sendEvent(t *testing.T, public, body, secret string) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, public+"/fortnox/webhook", strings.NewReader(body))
	sign := func(secret string) []byte {
		mac := hmac.New(sha256.New, []byte(secret))
		mac.Write([]byte(body))
		return mac.Sum(nil)
	}
	switch {
	case strings.HasPrefix(secret, "unpadded:"):
		req.Header.Set("X-Signature", base64.RawStdEncoding.EncodeToString(sign(strings.TrimPrefix(secret, "unpadded:"))))
	case strings.HasPrefix(secret, "rotating:"): // the old secret's signature first
		req.Header.Add("X-Signature", base64.StdEncoding.EncodeToString(sign("old-secret")))
		req.Header.Add("X-Signature", base64.StdEncoding.EncodeToString(sign(strings.TrimPrefix(secret, "rotating:"))))
	case secret != "":
		req.Header.Set("X-Signature", base64.StdEncoding.EncodeToString(sign(secret)))
	}
	req.Close = true // a config load closes kept-alive connections
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// Consent events: a verified "revoked" drops the tenant's token and its
// requests get 403 until a "created" (or a new refresh token) arrives; bad
// or missing signatures and malformed bodies change nothing.
func TestConsentWebhook(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, public := connectSidecar(t, fake, "")
	if status, _, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatal("warm-up failed")
	}
	revoked := `{"event":"client_credentials_consent_revoked","tenant_id":1234567,"scopes":["companyinformation"]}`
	for name, tc := range map[string]struct {
		body, secret string
		want         int
	}{
		"no signature":    {revoked, "", 401},
		"wrong signature": {revoked, "another-secret", 401},
		"not JSON":        {`{"event":`, "webhook-secret", 400},
		"no tenant":       {`{"event":"client_credentials_consent_revoked"}`, "webhook-secret", 400},
		"unknown event":   {`{"event":"something_else","tenant_id":"1234567"}`, "webhook-secret", 202},
		"unpadded base64": {`{"event":"something_else","tenant_id":"1234567"}`, "unpadded:webhook-secret", 202},
		"second header":   {`{"event":"something_else","tenant_id":"1234567"}`, "rotating:webhook-secret", 202},
	} {
		if got := sendEvent(t, public, tc.body, tc.secret); got != tc.want {
			t.Errorf("%s: %d, want %d", name, got, tc.want)
		}
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("a refused event changed the tenant: %d %s", status, body)
	}

	if got := sendEvent(t, public, revoked, "webhook-secret"); got != http.StatusNoContent {
		t.Fatalf("revoked event: %d", got)
	}
	status, body, resp := sc.get("/3/companyinformation", "1234567")
	if status != http.StatusForbidden {
		t.Fatalf("after revocation: %d %s", status, body)
	}
	if e := errorAnswer(t, resp, body); e.Error != "consent_revoked" || !strings.Contains(e.Message, "authorize") {
		t.Errorf("answer %+v", e)
	}
	if info := findTenant(sc.tenants(), "1234567"); info == nil || info.LastError == nil || !strings.Contains(*info.LastError, "consent_revoked") {
		t.Errorf("tenant row %+v", info)
	}
	if got := sendEvent(t, public, `{"event":"client_credentials_consent","tenant_id":"1234567"}`, "webhook-secret"); got != http.StatusNoContent {
		t.Fatalf("created event: %d", got)
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("after a new consent: %d %s", status, body)
	}
	// A created event also makes a new tenant known.
	sendEvent(t, public, `{"event":"client_credentials_consent","tenant_id":7654321}`, "webhook-secret")
	if findTenant(sc.tenants(), "7654321") == nil {
		t.Error("a consent-created tenant is not listed")
	}
}

func TestOnboardingCaddyfiles(t *testing.T) {
	var c Connect
	err := c.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`fortnox_connect {
		client_id id
		redirect_uri https://x.example/fortnox/callback
		scopes companyinformation invoice
		account_type off
		success_redirect https://app.example/ok
		cookie_secret {env.S}
		authorize_url https://a.example/auth
		token_url https://a.example/token
	}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Scopes != "companyinformation invoice" || c.AccountType != "off" || c.CookieSecret != "{env.S}" || c.SuccessRedirect != "https://app.example/ok" {
		t.Errorf("parsed %+v", c)
	}
	var wh Webhook
	err = wh.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`fortnox_webhook {
		client_id id
		secret {env.W}
		signature_header X-Fortnox-Signature
		signature_encoding hex
		tenant_field tenantId
		event_field type
		created_events a b
		revoked_events c
	}`))
	if err != nil {
		t.Fatal(err)
	}
	if wh.SignatureHeader != "X-Fortnox-Signature" || wh.SignatureEncoding != "hex" || len(wh.CreatedEvents) != 2 || wh.RevokedEvents[0] != "c" || wh.TenantField != "tenantId" {
		t.Errorf("parsed %+v", wh)
	}
	for _, bad := range []struct{ input, want string }{
		{"fortnox_connect {\n scopes\n}", "scopes needs at least one value"},
		{"fortnox_connect {\n cookie_secret a b\n}", "cookie_secret takes exactly one value"},
		{"fortnox_connect {\n bogus x\n}", `unrecognized subdirective "bogus"`},
		{"fortnox_webhook {\n created_events\n}", "created_events needs at least one value"},
		{"fortnox_webhook {\n secret\n}", "secret needs a value"},
	} {
		var err error
		if strings.HasPrefix(bad.input, "fortnox_connect") {
			err = new(Connect).UnmarshalCaddyfile(caddyfile.NewTestDispenser(bad.input))
		} else {
			err = new(Webhook).UnmarshalCaddyfile(caddyfile.NewTestDispenser(bad.input))
		}
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: %v, want %q", bad.input, err, bad.want)
		}
	}
}

// Bad onboarding configs are refused at load, naming the problem.
func TestOnboardingConfigErrors(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{})
	for _, tc := range []struct{ site, want string }{
		{"fortnox_connect {\n\t\tclient_id x\n\t\tredirect_uri https://x.example/cb\n\t\tscopes a\n\t\tcookie_secret short\n\t}", "cookie_secret must be at least 32 bytes"},
		{"fortnox_connect {\n\t\tclient_id x\n\t\tscopes a\n\t\tcookie_secret " + testCookieSecret + "\n\t}", "redirect_uri is required"},
		{"fortnox_connect {\n\t\tclient_id x\n\t\tredirect_uri https://x.example/cb\n\t\tcookie_secret " + testCookieSecret + "\n\t}", "scopes is required"},
		{"fortnox_webhook {\n\t\tclient_id x\n\t}", "secret is required"},
		{"fortnox_connect {\n\t\tclient_id x\n\t\tredirect_uri http://connect.example.com/cb\n\t\tscopes a\n\t\tcookie_secret " + testCookieSecret + "\n\t}", "must be https"},
		{"fortnox_webhook {\n\t\tclient_id x\n\t\tsecret s\n\t\talgorithm md5\n\t}", `algorithm "md5" is not supported`},
		{"fortnox_webhook {\n\t\tclient_id x\n\t\tsecret s\n\t\tsignature_encoding base32\n\t}", "signature_encoding must be base64 or hex"},
	} {
		sc := &sidecar{t: t, fake: fake, dir: t.TempDir()}
		sc.caddyfileTemplate = caddyfileTemplate{port: freePort(t), adminPort: freePort(t), tokenURL: fake.TokenURL(), upstream: fake.URL(),
			extraSites: fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\t%s\n}\n", freePort(t), tc.site)}
		t.Setenv("FORTNOX_TEST_CLIENT_ID", testClientID)
		t.Setenv("FORTNOX_TEST_CLIENT_SECRET", testClientSecret)
		err := sc.load()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.want, err, tc.want)
		}
	}
}

// A browser that leaves while the code is exchanged does not lose the
// customer's grant: Fortnox has spent the code, so the tokens are stored.
func TestConnectSurvivesTheBrowserLeaving(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizeAs("5550002", "7")
	sc, public := connectSidecar(t, fake, "")
	loc, cookie := startConnect(t, public)
	cb := authorize(t, loc)
	fake.SetFault(fakefortnox.Fault{Delay: 300 * time.Millisecond})
	impatient := &http.Client{Timeout: 50 * time.Millisecond}
	req, _ := http.NewRequest(http.MethodGet, cb, nil)
	req.AddCookie(cookie)
	if resp, err := impatient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatal("the browser did not leave; the test proves nothing")
	}
	eventually(t, 5*time.Second, "the grant to be stored", func() bool {
		_, err := os.Stat(sc.recordPath("5550002"))
		return err == nil
	})
	if !fake.RefreshTokenValid(sc.storedRecord("5550002").RefreshToken) {
		t.Error("the stored refresh token is not the live one")
	}
}

// A revoked event that arrives while a token request is in flight wins:
// the token that request brings back is not used.
func TestRevocationDuringATokenRequest(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, public := connectSidecar(t, fake, "")
	fake.SetFault(fakefortnox.Fault{Delay: 300 * time.Millisecond})
	first := make(chan int, 1)
	go func() {
		status, _, _ := sc.get("/3/companyinformation", "1234567")
		first <- status
	}()
	eventually(t, 5*time.Second, "the token request", func() bool { return fake.TokenRequests("", "1234567") == 1 })
	revoked := `{"event":"client_credentials_consent_revoked","tenant_id":1234567}`
	if got := sendEvent(t, public, revoked, "webhook-secret"); got != http.StatusNoContent {
		t.Fatalf("revoked event: %d", got)
	}
	<-first // it was already on its way; it may have been served
	fake.ClearFault()
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusForbidden {
		t.Fatalf("after revocation: %d %s", status, body)
	}
}
