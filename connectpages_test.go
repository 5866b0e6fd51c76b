package fortnox

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// pagesSite is a sidecar with a connect site that answers on both
// 127.0.0.1 and localhost (redirect_uri names 127.0.0.1), with link_key
// and app_name "Bokföringsappen" plus options. It returns the sidecar and
// the site's port.
func pagesSite(t *testing.T, fake *fakefortnox.Server, options string) (*sidecar, int) {
	t.Helper()
	t.Setenv("FORTNOX_TEST_COOKIE_SECRET", testCookieSecret)
	t.Setenv("FORTNOX_TEST_LINK_KEY", testLinkKey)
	port := freePort(t)
	sc := startSidecar(t, fake, "")
	sc.extraSites = fmt.Sprintf(`
http://127.0.0.1:%[1]d, http://localhost:%[1]d {
	bind 127.0.0.1
	fortnox_connect {
		client_id {env.FORTNOX_TEST_CLIENT_ID}
		token_url %[2]s
		authorize_url %[3]s/oauth-v1/auth
		redirect_uri http://127.0.0.1:%[1]d/fortnox/callback
		scopes companyinformation
		cookie_secret {env.FORTNOX_TEST_COOKIE_SECRET}
		link_key {env.FORTNOX_TEST_LINK_KEY}
		app_name Bokföringsappen%[4]s
	}
	respond "next handler" 200
}
`, port, fake.TokenURL(), fake.URL(), indentOptions(options))
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	return sc, port
}

// fetch GETs u with the browser client (no redirects followed) and
// Accept-Language lang ("" = none).
func fetch(t *testing.T, b *http.Client, u, lang string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if lang != "" {
		req.Header.Set("Accept-Language", lang)
	}
	resp, err := b.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

// flowToCallback starts a flow at link in b and lets the fake approve:
// it returns the callback URL Fortnox sends the browser to, and the
// flow's state cookie as set.
func flowToCallback(t *testing.T, b *http.Client, link string) (string, *http.Cookie) {
	t.Helper()
	resp, body := fetch(t, b, link, "")
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("GET %s: %d %s", link, resp.StatusCode, body)
	}
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if strings.HasPrefix(c.Name, stateCookiePrefix) {
			cookie = c
		}
	}
	resp, body = fetch(t, b, resp.Header.Get("Location"), "")
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("authorize: %d %s", resp.StatusCode, body)
	}
	return resp.Header.Get("Location"), cookie
}

// resolve makes a Location absolute against base.
func resolve(t *testing.T, base, loc string) string {
	t.Helper()
	b, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	u, err := b.Parse(loc)
	if err != nil {
		t.Fatal(err)
	}
	return u.String()
}

var styleNonce = regexp.MustCompile(`<style nonce="([^"]+)">`)

// checkPageHeaders checks the headers and the frame every page has.
func checkPageHeaders(t *testing.T, what string, resp *http.Response, body, lang string) {
	t.Helper()
	h := resp.Header
	csp := h.Get("Content-Security-Policy")
	m := styleNonce.FindStringSubmatch(body)
	if m == nil || !strings.Contains(csp, "style-src 'nonce-"+m[1]+"'") || !strings.Contains(csp, "frame-ancestors 'none'") || !strings.Contains(csp, "default-src 'none'") {
		t.Errorf("%s: CSP %q does not allow the page's style (%v) or allows framing", what, csp, m)
	}
	if h.Get("Referrer-Policy") != "no-referrer" || h.Get("Cache-Control") != "no-store" || !strings.HasPrefix(h.Get("Content-Type"), "text/html") {
		t.Errorf("%s: headers %v", what, h)
	}
	for _, want := range []string{`<html lang="` + lang + `">`, `<meta name="viewport" content="width=device-width, initial-scale=1">`, "Bokföringsappen"} {
		if !strings.Contains(body, want) {
			t.Errorf("%s: the page lacks %q:\n%s", what, want, body)
		}
	}
	if title := regexp.MustCompile(`<title>([^<]*)</title>`).FindStringSubmatch(body); title == nil || !strings.Contains(title[1], "Bokföringsappen") {
		t.Errorf("%s: title %v lacks app_name", what, title)
	}
	for _, bad := range []string{"cookie", "account_type", "redirect_uri", "TenantId " + "is", "error:", "%!"} {
		if strings.Contains(strings.ToLower(body), strings.ToLower(bad)) {
			t.Errorf("%s: the page says %q", what, bad)
		}
	}
}

// One flow over HTTP: the cookie (its own name, path, Max-Age a minute
// past the state), the 303 to a result page that a reload shows again,
// the cookie deleted by its own state's return, the page's headers, and
// the already-connected page when the state comes back.
func TestConnectPagesFlow(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizeAs("5550101", "7")
	sc, port := pagesSite(t, fake, "")
	public := fmt.Sprintf("http://127.0.0.1:%d", port)
	b := browser(t)

	resp, _ := fetch(t, b, public+"/fortnox/connect", "")
	loc, _ := url.Parse(resp.Header.Get("Location"))
	state := loc.Query().Get("state")
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		cookie = c
	}
	if len(resp.Cookies()) != 1 || cookie.Name != "fortnox_connect_"+state[:16] || cookie.Path != "/fortnox/callback" ||
		cookie.MaxAge != int((stateLifetime+time.Minute)/time.Second) || !cookie.HttpOnly || cookie.SameSite != http.SameSiteLaxMode {
		t.Fatalf("state cookie %+v for state %s", resp.Cookies(), state)
	}
	if resp.Header.Get("Cache-Control") != "no-store" || resp.Header.Get("Referrer-Policy") != "no-referrer" {
		t.Errorf("connect redirect headers %v", resp.Header)
	}
	resp, _ = fetch(t, b, loc.String(), "")
	cb := resp.Header.Get("Location")

	resp, _ = fetch(t, b, cb, "sv-SE,sv;q=0.9,en;q=0.5")
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/fortnox/callback?result=") {
		t.Fatalf("callback: %d, Location %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	deleted := false
	for _, c := range resp.Cookies() {
		deleted = deleted || c.Name == cookie.Name && c.MaxAge < 0
	}
	if !deleted {
		t.Errorf("the callback did not delete its cookie: %v", resp.Header["Set-Cookie"])
	}
	result := resolve(t, cb, resp.Header.Get("Location"))
	for i, lang := range []string{"sv-SE,sv;q=0.9,en;q=0.5", "en-GB,en;q=0.9,sv;q=0.3"} {
		resp, body := fetch(t, b, result, lang)
		want, close := "sv", "Du kan stänga det här fönstret."
		if i == 1 {
			want, close = "en", "You may close this window."
		}
		if resp.StatusCode != http.StatusOK || !strings.Contains(body, close) || !strings.Contains(body, `<strong id="tenant">5550101</strong>`) {
			t.Errorf("result page (%s), reload %d: %d %s", lang, i, resp.StatusCode, body)
		}
		checkPageHeaders(t, "result page "+want, resp, body, want)
	}
	if !fake.RefreshTokenValid(sc.storedRecord("5550101").RefreshToken) {
		t.Error("the stored refresh token is not the live one")
	}
	// The state comes back (history, another tab): already connected,
	// nothing exchanged again.
	exchanges := fake.TokenRequests("authorization_code", "")
	resp, body := fetch(t, browser(t), cb, "en")
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "Already connected") || !strings.Contains(body, "5550101") {
		t.Errorf("the state again: %d %s", resp.StatusCode, body)
	}
	checkPageHeaders(t, "already connected", resp, body, "en")
	if n := fake.TokenRequests("authorization_code", "") - exchanges; n != 0 {
		t.Errorf("%d more code exchanges", n)
	}
	// A result address that is not ours, and one past the state's life.
	if resp, body := fetch(t, b, public+"/fortnox/callback?result=x"+strings.TrimPrefix(result, public+"/fortnox/callback?result="), "en"); resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "no longer available") {
		t.Errorf("a forged result: %d %s", resp.StatusCode, body)
	}
	advance(fake, stateLifetime+time.Second)
	if resp, body := fetch(t, b, result, "en"); resp.StatusCode != http.StatusGone || !strings.Contains(body, "no longer available") {
		t.Errorf("an old result: %d %s", resp.StatusCode, body)
	}
}

// Two flows in two tabs of one browser both finish, whichever returns
// first; an old callback opened meanwhile does not break the other.
func TestConnectTwoFlows(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc, port := pagesSite(t, fake, "")
	public := fmt.Sprintf("http://127.0.0.1:%d", port)
	b := browser(t)
	fake.SetAuthorizeAs("5550201", "7")
	cbA, _ := flowToCallback(t, b, public+"/fortnox/connect")
	fake.SetAuthorizeAs("5550202", "7")
	cbB, _ := flowToCallback(t, b, public+"/fortnox/connect")
	if n := len(b.Jar.Cookies(&url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", port), Path: "/fortnox/callback"})); n != 2 {
		t.Fatalf("%d state cookies for two flows", n)
	}
	for _, tc := range []struct{ cb, tenant string }{{cbB, "5550202"}, {cbA, "5550201"}} {
		resp, _ := fetch(t, b, tc.cb, "en")
		if resp.StatusCode != http.StatusSeeOther {
			t.Fatalf("callback of %s: %d", tc.tenant, resp.StatusCode)
		}
		resp, body := fetch(t, b, resolve(t, tc.cb, resp.Header.Get("Location")), "en")
		if resp.StatusCode != http.StatusOK || !strings.Contains(body, tc.tenant) {
			t.Errorf("result of %s: %d %s", tc.tenant, resp.StatusCode, body)
		}
		if !fake.RefreshTokenValid(sc.storedRecord(tc.tenant).RefreshToken) {
			t.Errorf("%s: the stored refresh token is not the live one", tc.tenant)
		}
		// B's old callback again in the middle: already connected.
		if resp, body := fetch(t, b, cbB, "en"); resp.StatusCode != http.StatusOK || !strings.Contains(body, "Already connected") {
			t.Errorf("B's callback again: %d %s", resp.StatusCode, body)
		}
	}
}

// A flow that takes longer than the state lives is told so (the cookie
// outlives it by a minute), and nothing is exchanged or stored.
func TestConnectFlowTookTooLong(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizeAs("5550301", "7")
	sc, port := pagesSite(t, fake, "")
	b := browser(t)
	cb, _ := flowToCallback(t, b, fmt.Sprintf("http://127.0.0.1:%d/fortnox/connect", port))
	advance(fake, stateLifetime+time.Second)
	resp, body := fetch(t, b, cb, "sv")
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "Det tog för lång tid") || !strings.Contains(body, `id="start-again" href="/fortnox/connect"`) {
		t.Errorf("an expired flow: %d %s", resp.StatusCode, body)
	}
	checkPageHeaders(t, "took too long", resp, body, "sv")
	if n := fake.TokenRequests("authorization_code", ""); n != 0 {
		t.Errorf("%d code exchanges for an expired flow", n)
	}
	if _, err := os.Stat(sc.recordPath("5550301")); err == nil {
		t.Error("an expired flow stored a token")
	}
}

// A connect link opened on another host name than redirect_uri's is sent
// there first (path and query kept, no cookie set on the wrong host).
func TestConnectOtherHostName(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	_, port := pagesSite(t, fake, "account_type off")
	b := browser(t)
	link := signLink(t, fmt.Sprintf("http://localhost:%d/fortnox/connect?account=anna&tenant=1234567", port), time.Hour)
	resp, _ := fetch(t, b, link, "")
	want := strings.Replace(link, "localhost", "127.0.0.1", 1)
	if resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != want || len(resp.Cookies()) != 0 {
		t.Fatalf("on localhost: %d, Location %q (want %q), cookies %v", resp.StatusCode, resp.Header.Get("Location"), want, resp.Cookies())
	}
	fake.SetAuthorizeAs("1234567", annaUser)
	if status, page := connectFlow(t, fake, want); status != http.StatusOK || !strings.Contains(page, `id="account">anna<`) {
		t.Errorf("the flow on the redirected host: %d %s", status, page)
	}
	if !sameHost("example.com:443", &url.URL{Scheme: "https", Host: "example.com"}) || sameHost("www.example.com", &url.URL{Scheme: "https", Host: "example.com"}) ||
		!sameHost("Example.com", &url.URL{Scheme: "https", Host: "example.com:443"}) {
		t.Error("sameHost")
	}
}

// success_redirect gets tenant and account (its own query kept); a
// failure still shows the result page.
func TestConnectSuccessRedirectNamesTenantAndAccount(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	_, port := pagesSite(t, fake, "account_type off\nsuccess_redirect https://app.example/done?from=fortnox")
	b := browser(t)
	fake.SetAuthorizeAs("1234567", annaUser)
	cb, _ := flowToCallback(t, b, signLink(t, fmt.Sprintf("http://127.0.0.1:%d/fortnox/connect?account=anna&tenant=1234567", port), time.Hour))
	resp, _ := fetch(t, b, cb, "")
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "https://app.example/done?account=anna&from=fortnox&tenant=1234567" {
		t.Errorf("success: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	fake.SetAuthorizeDeny("access_denied", "nej")
	cb, _ = flowToCallback(t, b, signLink(t, fmt.Sprintf("http://127.0.0.1:%d/fortnox/connect?account=bo&tenant=1234567", port), time.Hour))
	resp, _ = fetch(t, b, cb, "")
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/fortnox/callback?result=") {
		t.Errorf("denied: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
}

// Fortnox's error_description is cut on a character boundary and
// escaped; the denial page offers to start again with the same signed
// link; the page is in Swedish for sv.
func TestConnectDeniedPage(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	long := strings.Repeat("å", 199) + "ä<b>ö</b>" + strings.Repeat("x", 50)
	fake.SetAuthorizeDeny("access_denied", long)
	_, port := pagesSite(t, fake, "account_type off")
	b := browser(t)
	link := signLink(t, fmt.Sprintf("http://127.0.0.1:%d/fortnox/connect?account=anna&tenant=1234567", port), time.Hour)
	cb, _ := flowToCallback(t, b, link)
	resp, _ := fetch(t, b, cb, "")
	resp, body := fetch(t, b, resolve(t, cb, resp.Header.Get("Location")), "sv")
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "Anslutningen avbröts") || !strings.Contains(body, "godkändes inte i Fortnox") {
		t.Fatalf("denied: %d %s", resp.StatusCode, body)
	}
	checkPageHeaders(t, "denied", resp, body, "sv")
	detail := regexp.MustCompile(`<span id="detail">([^<]*)</span>`).FindStringSubmatch(body)
	if detail == nil || detail[1] != strings.Repeat("å", 199)+"ä…" || !utf8.ValidString(body) {
		t.Errorf("Fortnox's description as shown: %q", detail)
	}
	start := regexp.MustCompile(`id="start-again" href="([^"]+)"`).FindStringSubmatch(body)
	if start == nil || strings.ReplaceAll(start[1], "&amp;", "&") != strings.TrimPrefix(link, fmt.Sprintf("http://127.0.0.1:%d", port)) {
		t.Errorf("start again %q, want the signed link %s", start, link)
	}
	if cutRunes("a\x00b\xffc", 10) != "a bc" || cutRunes("åäö", 2) != "åä…" {
		t.Error("cutRunes")
	}
}

// pickLanguage: Swedish when it comes first, English otherwise.
func TestConnectPickLanguage(t *testing.T) {
	for header, want := range map[string]string{
		"": "en", "sv": "sv", "sv-SE": "sv", "sv-SE,sv;q=0.9,en-US;q=0.8": "sv", "en-US,en;q=0.9,sv;q=0.8": "en",
		"en;q=0.5, sv": "sv", "de-DE,de;q=0.9": "en", "de,sv;q=0.5": "sv", "fi,en;q=0.7,sv;q=0.5": "en", "SV-fi": "sv", "sv;q=0": "en",
	} {
		if got := pickLanguage(header); got != want {
			t.Errorf("pickLanguage(%q) = %s, want %s", header, got, want)
		}
	}
}

// page_template replaces the built-in page with the documented fields; a
// template that does not parse or names an unknown field fails the load.
func TestConnectPageTemplate(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	dir := t.TempDir()
	good := filepath.Join(dir, "page.html")
	os.WriteFile(good, []byte(`<!doctype html><html lang="{{.Lang}}"><head><meta name="viewport" content="width=device-width, initial-scale=1"><title>{{.Title}}</title><style nonce="{{.Nonce}}">{{.Style}}</style></head>`+
		`<body class="mine"><h1>{{.Heading}}</h1><p>{{.Message}}</p>{{if .Success}}<p id="ok">{{.Kind}} {{.Tenant}} {{.Account}} {{.CloseHint}}</p>{{end}}{{if .StartAgainURL}}<a href="{{.StartAgainURL}}">{{.StartAgain}}</a>{{end}}{{.Labels.Company}}{{.Detail}}{{.AppName}}{{.Status}}</body></html>`), 0o600)
	fake.SetAuthorizeAs("5550401", "7")
	_, port := pagesSite(t, fake, "page_template "+good)
	status, page := connectFlow(t, fake, fmt.Sprintf("http://127.0.0.1:%d/fortnox/connect", port))
	if status != http.StatusOK || !strings.Contains(page, `<body class="mine">`) || !strings.Contains(page, `<p id="ok">connected 5550401  You may close this window.</p>`) {
		t.Errorf("with page_template: %d %s", status, page)
	}
	for name, text := range map[string]string{"broken.html": "{{if .Success}}", "unknown.html": "{{.NoSuchField}}"} {
		file := filepath.Join(dir, name)
		os.WriteFile(file, []byte(text), 0o600)
		sc := &sidecar{t: t, fake: fake, dir: t.TempDir()}
		sc.caddyfileTemplate = caddyfileTemplate{port: freePort(t), adminPort: freePort(t), tokenURL: fake.TokenURL(), upstream: fake.URL(),
			extraSites: fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\tfortnox_connect {\n\t\tclient_id x\n\t\ttoken_url %s\n\t\tredirect_uri http://127.0.0.1/fortnox/callback\n\t\tscopes a\n\t\tcookie_secret %s\n\t\tpage_template %s\n\t}\n}\n",
				freePort(t), fake.TokenURL(), testCookieSecret, file)}
		if err := sc.load(); err == nil || !strings.Contains(err.Error(), "page_template") || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// Every failed callback is logged with its cause, once a minute per
// cause with the count of those left out; never a code.
func TestConnectCallbackFailuresLogged(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc, port := pagesSite(t, fake, "")
	public := fmt.Sprintf("http://127.0.0.1:%d", port)
	b := browser(t)
	cb, _ := flowToCallback(t, b, public+"/fortnox/connect")
	code := func() string { u, _ := url.Parse(cb); return u.Query().Get("code") }()
	stranger := browser(t) // has no cookie
	for i := 0; i < 5; i++ {
		if resp, _ := fetch(t, stranger, cb, ""); resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("a callback without cookie: %d", resp.StatusCode)
		}
	}
	lines := sc.logLinesStarting("connect callback refused")
	if len(lines) != 1 || lines[0]["cause"] != "state_no_cookie" {
		t.Fatalf("log lines for 5 refusals: %v", lines)
	}
	advance(fake, time.Minute+time.Second)
	fetch(t, stranger, cb, "")
	lines = sc.logLinesStarting("connect callback refused")
	if len(lines) != 2 || lines[1]["not_logged"] != float64(4) {
		t.Errorf("after a minute: %v", lines)
	}
	b2, _ := os.ReadFile(sc.logPath())
	if strings.Contains(string(b2), code) {
		t.Error("the log holds the code")
	}
}

// The Caddyfile takes the new options (app_name with spaces as one
// quoted value).
func TestConnectPageOptionsParse(t *testing.T) {
	var c Connect
	err := c.UnmarshalCaddyfile(caddyfile.NewTestDispenser("fortnox_connect {\n link_key {env.K}\n app_name \"Min Bokföring\"\n page_template /etc/caddy/connect.html\n}"))
	if err != nil || c.LinkKey != "{env.K}" || c.AppName != "Min Bokföring" || c.PageTemplate != "/etc/caddy/connect.html" {
		t.Errorf("parsed %+v %v", c, err)
	}
}

// The same callback twice at once (a double click): the second says the
// connection is being completed, and once it is, already connected.
func TestConnectCallbackTwiceAtOnce(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizeAs("5550701", "7")
	_, port := pagesSite(t, fake, "")
	b := browser(t)
	cb, cookie := flowToCallback(t, b, fmt.Sprintf("http://127.0.0.1:%d/fortnox/connect", port))
	fake.SetFault(fakefortnox.Fault{Delay: 500 * time.Millisecond})
	first := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodGet, cb, nil)
		req.AddCookie(cookie)
		resp, err := noRedirects.Do(req)
		if err != nil {
			first <- 0
			return
		}
		resp.Body.Close()
		first <- resp.StatusCode
	}()
	eventually(t, 5*time.Second, "the code exchange", func() bool { return fake.TokenRequests("authorization_code", "") == 1 })
	resp, body := fetch(t, b, cb, "en")
	if resp.StatusCode != http.StatusConflict || !strings.Contains(body, "being completed") {
		t.Errorf("the callback again while the first is at work: %d %s", resp.StatusCode, body)
	}
	if got := <-first; got != http.StatusSeeOther {
		t.Fatalf("the first callback: %d", got)
	}
	fake.ClearFault()
	if resp, body := fetch(t, b, cb, "en"); resp.StatusCode != http.StatusOK || !strings.Contains(body, "Already connected") {
		t.Errorf("after it finished: %d %s", resp.StatusCode, body)
	}
}
