package fortnox

import (
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"strings"
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// connectSite is a sidecar with a public site that has fortnox_connect
// (plus options, where PUBLIC stands for the site's URL) and, after it,
// a handler that names the path it was reached with. Lines in before go
// ahead of fortnox_connect (e.g. a `uri` rewrite). It returns the sidecar,
// the site's URL and a function that reloads the site with other options.
func connectSite(t *testing.T, fake *fakefortnox.Server, before, options string) (*sidecar, string, func(before, options string)) {
	t.Helper()
	t.Setenv("FORTNOX_TEST_COOKIE_SECRET", testCookieSecret)
	port := freePort(t)
	public := fmt.Sprintf("http://127.0.0.1:%d", port)
	sc := startSidecar(t, fake, "")
	reload := func(before, options string) {
		t.Helper()
		sc.extraSites = fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1%s
	fortnox_connect {
		client_id {env.FORTNOX_TEST_CLIENT_ID}
		token_url %s
		authorize_url %s/oauth-v1/auth
		scopes companyinformation
		cookie_secret {env.FORTNOX_TEST_COOKIE_SECRET}%s
	}
	respond "next handler: {http.request.uri.path}" 200
}
`, port, strings.ReplaceAll(indentOptions(before), "\t\t", "\t"), fake.TokenURL(), fake.URL(), strings.ReplaceAll(indentOptions(options), "PUBLIC", public))
		if err := sc.load(); err != nil {
			t.Fatal(err)
		}
	}
	reload(before, options)
	return sc, public, reload
}

// getPage GETs url with client (which follows no redirects) and returns
// the status, the body and the Location header.
func getPage(t *testing.T, client *http.Client, url string) (int, string, string) {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header.Get("Location")
}

// browser is an HTTP client that keeps cookies as a browser does (by
// path) and follows no redirects.
func browser(t *testing.T) *http.Client {
	t.Helper()
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{
		Jar:           jar,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		Transport:     &http.Transport{DisableKeepAlives: true}, // reloads close the old server's connections
	}
}

// connectAs runs a whole connection in a browser, from connectURL to the
// result page, with the fake approving as tenant, and returns the page's
// status and text.
func connectAs(t *testing.T, fake *fakefortnox.Server, connectURL, tenant string) (int, string) {
	t.Helper()
	fake.SetAuthorizeAs(tenant, "7")
	return connectFlow(t, fake, connectURL)
}

// fortnox_connect answers exactly its two paths: other paths of the site
// that merely end in /connect or /callback, or differ by a slash or a
// letter's case, reach the next handler.
func TestConnectMatchesOnlyItsOwnPaths(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	_, public, _ := connectSite(t, fake, "", "redirect_uri PUBLIC/fortnox/callback")
	client := browser(t)
	for _, path := range []string{
		"/app/connect", "/x/callback", "/connect", "/callback",
		"/other/fortnox/connect", "/other/fortnox/callback",
		"/fortnox/connect/", "/fortnox/callback/", "/fortnox/connect/more",
		"/fortnox/Connect", "/fortnox/webhook",
	} {
		status, body, _ := getPage(t, client, public+path)
		if status != http.StatusOK || body != "next handler: "+path {
			t.Errorf("GET %s: %d %q, want the next handler", path, status, body)
		}
	}
	// Its own paths are its own.
	if status, body, loc := getPage(t, client, public+"/fortnox/connect"); status != http.StatusFound || !strings.Contains(loc, "/oauth-v1/auth?") {
		t.Errorf("GET /fortnox/connect: %d %s %q", status, body, loc)
	}
	if status, body, _ := getPage(t, browser(t), public+"/fortnox/callback?state=x&code=y"); status != http.StatusBadRequest || !strings.Contains(body, "started in another browser") {
		t.Errorf("GET /fortnox/callback: %d %s", status, body)
	}
}

// connect_path and callback_path move the two paths: the flow works on
// them (in a browser, which sends the state cookie only to the callback
// path it sees), and the default paths become the site's again.
func TestConnectCustomPaths(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc, public, reload := connectSite(t, fake, "", "redirect_uri PUBLIC/onboard/done\nconnect_path /onboard/start")
	client := browser(t)
	for _, path := range []string{"/fortnox/connect", "/fortnox/callback", "/onboard/connect"} {
		if status, body, _ := getPage(t, client, public+path); status != http.StatusOK || body != "next handler: "+path {
			t.Errorf("GET %s with custom paths: %d %q, want the next handler", path, status, body)
		}
	}
	status, body := connectAs(t, fake, public+"/onboard/start", "5550011")
	if status != http.StatusOK || !strings.Contains(body, `<strong id="tenant">5550011</strong>`) {
		t.Fatalf("connection through connect_path: %d %s", status, body)
	}
	if !fake.RefreshTokenValid(sc.storedRecord("5550011").RefreshToken) {
		t.Error("the stored refresh token is not the live one")
	}

	// Behind a prefix the site strips, callback_path is the path the
	// handler sees and redirect_uri the one the browser sees; the connect
	// path defaults to "connect" beside callback_path.
	reload("uri strip_prefix /public", "redirect_uri PUBLIC/public/fortnox/done\ncallback_path /fortnox/done")
	status, body = connectAs(t, fake, public+"/public/fortnox/connect", "5550012")
	if status != http.StatusOK || !strings.Contains(body, `<strong id="tenant">5550012</strong>`) {
		t.Fatalf("connection behind a stripped prefix: %d %s", status, body)
	}
	if !fake.RefreshTokenValid(sc.storedRecord("5550012").RefreshToken) {
		t.Error("the stored refresh token is not the live one")
	}
	if status, body, _ := getPage(t, client, public+"/public/fortnox/callback"); status != http.StatusOK || body != "next handler: /fortnox/callback" {
		t.Errorf("the default callback path with callback_path set: %d %q", status, body)
	}
}

// Bad paths are refused at load, naming the problem.
func TestConnectPathConfigErrors(t *testing.T) {
	var c Connect
	err := c.UnmarshalCaddyfile(caddyfile.NewTestDispenser("fortnox_connect {\n connect_path /a/start\n callback_path /a/done\n}"))
	if err != nil || c.ConnectPath != "/a/start" || c.CallbackPath != "/a/done" {
		t.Errorf("parsed %+v %v", c, err)
	}
	fake := startFake(t, fakefortnox.Options{})
	t.Setenv("FORTNOX_TEST_CLIENT_ID", testClientID)
	t.Setenv("FORTNOX_TEST_CLIENT_SECRET", testClientSecret)
	for _, tc := range []struct{ options, want string }{
		{"redirect_uri https://x.example/fortnox/callback\nconnect_path /fortnox/callback", `connect_path and callback_path are both "/fortnox/callback"`},
		{"redirect_uri https://x.example/fortnox/callback\ncallback_path /x/connect", `connect_path and callback_path are both "/x/connect"`},
		{"redirect_uri https://x.example/fortnox/callback\nconnect_path fortnox/connect", `connect_path "fortnox/connect" must start with /`},
		{"redirect_uri https://x.example/fortnox/callback\nconnect_path /start\ncallback_path done", `callback_path "done" must start with /`},
		{"redirect_uri https://x.example", "has no path for the callback"},
		{"redirect_uri https://x.example/", "has no path for the callback"},
	} {
		sc := &sidecar{t: t, fake: fake, dir: t.TempDir()}
		sc.caddyfileTemplate = caddyfileTemplate{port: freePort(t), adminPort: freePort(t), tokenURL: fake.TokenURL(), upstream: fake.URL(),
			extraSites: fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\tfortnox_connect {\n\t\tclient_id x\n\t\tscopes a\n\t\tcookie_secret %s%s\n\t}\n}\n",
				freePort(t), testCookieSecret, indentOptions(tc.options))}
		err := sc.load()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.options, err, tc.want)
		}
	}
}
