package fortnox

import (
	"bytes"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

const testLinkKey = "link-key-for-tests-0123456789abcdef-xyz"

// signLink adds expires (now + ttl) and sig, signed with testLinkKey, to
// a connect link.
func signLink(t testing.TB, link string, ttl time.Duration) string {
	t.Helper()
	u, err := url.Parse(link)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("expires", strconv.FormatInt(clk.Now().Add(ttl).Unix(), 10))
	q.Set("sig", linkSignature([]byte(testLinkKey), q))
	u.RawQuery = q.Encode()
	return u.String()
}

// connectFlow runs a whole connection in a fresh browser, from link to
// the page the browser ends on (after the callback's redirect to its
// result, if any), with the fake approving as SetAuthorizeAs says.
func connectFlow(t *testing.T, fake *fakefortnox.Server, link string) (int, string) {
	t.Helper()
	b := browser(t)
	status, body, loc := getPage(t, b, link)
	if status != http.StatusFound || !strings.HasPrefix(loc, fake.URL()+"/oauth-v1/auth?") {
		t.Fatalf("GET %s: %d %s, Location %q", link, status, body, loc)
	}
	status, body, cb := getPage(t, b, loc)
	if status != http.StatusFound {
		t.Fatalf("authorize: %d %s", status, body)
	}
	status, body, loc = getPage(t, b, cb)
	if status == http.StatusSeeOther {
		next, err := url.Parse(cb)
		if err != nil {
			t.Fatal(err)
		}
		ref, err := next.Parse(loc)
		if err != nil {
			t.Fatal(err)
		}
		status, body, _ = getPage(t, b, ref.String())
	}
	return status, body
}

// refusedLink GETs link and checks that it is refused with status and a
// page, no redirect and no state cookie.
func refusedLink(t *testing.T, what, link string, status int, want string) {
	t.Helper()
	b := browser(t)
	got, body, loc := getPage(t, b, link)
	if got != status || loc != "" || !strings.Contains(body, want) {
		t.Errorf("%s: %d, Location %q, page %s; want %d and %q", what, got, loc, body, status, want)
	}
	u, _ := url.Parse(link)
	for _, c := range b.Jar.Cookies(&url.URL{Scheme: "http", Host: u.Host, Path: "/fortnox/callback"}) {
		t.Errorf("%s: a cookie was set: %s", what, c.Name)
	}
}

// Signed connect links: a good one goes to Fortnox and connects the
// account; a missing, wrong, tampered, expired or too distant signature
// gets 403 and a page, reaches no Fortnox and stores nothing.
func TestConnectSignedLinks(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizeAs("1234567", annaUser)
	sc, public := connectSidecar(t, fake, "account_type off")
	base := public + "/fortnox/connect?account=anna&tenant=1234567"

	good := signLink(t, base, time.Hour)
	parsed, _ := url.Parse(good)
	q := parsed.Query()
	with := func(edit func(q url.Values)) string {
		c := url.Values{}
		for k, v := range q {
			c[k] = append([]string(nil), v...)
		}
		edit(c)
		return public + "/fortnox/connect?" + c.Encode()
	}
	resign := func(edit func(q url.Values), key string) string {
		return with(func(c url.Values) {
			edit(c)
			c.Set("sig", linkSignature([]byte(key), c))
		})
	}
	notValid := "not valid"
	for _, tc := range []struct{ what, link string }{
		{"no sig", with(func(c url.Values) { c.Del("sig") })},
		{"no expires", with(func(c url.Values) { c.Del("expires") })},
		{"neither", base},
		{"empty sig", with(func(c url.Values) { c.Set("sig", "") })},
		{"uppercase hex", with(func(c url.Values) { c.Set("sig", strings.ToUpper(c.Get("sig"))) })},
		{"another key", resign(func(url.Values) {}, "another-link-key-0123456789abcdef-xyz")},
		{"account changed", with(func(c url.Values) { c.Set("account", "bo") })},
		{"tenant changed", with(func(c url.Values) { c.Set("tenant", "7654321") })},
		{"expires changed", with(func(c url.Values) {
			c.Set("expires", strconv.FormatInt(clk.Now().Add(2*time.Hour).Unix(), 10))
		})},
		{"parameter added", with(func(c url.Values) { c.Set("from", "x") })},
		{"sig twice", with(func(c url.Values) { c.Add("sig", c.Get("sig")) })},
		{"expires not a number", resign(func(c url.Values) { c.Set("expires", "tomorrow") }, testLinkKey)},
		{"expired", resign(func(c url.Values) {
			c.Set("expires", strconv.FormatInt(clk.Now().Add(-time.Second).Unix(), 10))
		}, testLinkKey)},
		{"too far ahead", resign(func(c url.Values) {
			c.Set("expires", strconv.FormatInt(clk.Now().Add(7*24*time.Hour+time.Minute).Unix(), 10))
		}, testLinkKey)},
	} {
		refusedLink(t, tc.what, tc.link, http.StatusForbidden, notValid)
	}
	if q := fake.LastAuthorizeQuery(); q != nil {
		t.Fatalf("a refused link reached Fortnox: %v", q)
	}

	// A link that was good expires.
	aging := signLink(t, base, time.Hour)
	advance(fake, time.Hour+time.Second)
	refusedLink(t, "after an hour", aging, http.StatusForbidden, notValid)
	if q := fake.LastAuthorizeQuery(); q != nil {
		t.Fatalf("an expired link reached Fortnox: %v", q)
	}
	if _, err := os.Stat(sc.accountRecordPath("1234567", "anna")); err == nil {
		t.Fatal("a refused link stored an account")
	}

	// Seven days ahead is still good, and a good link connects the account.
	for _, link := range []string{signLink(t, base, 7*24*time.Hour-time.Minute), signLink(t, base, time.Hour)} {
		status, _, loc := getPage(t, browser(t), link)
		if status != http.StatusFound || !strings.HasPrefix(loc, fake.URL()+"/oauth-v1/auth?") {
			t.Fatalf("a good link: %d, Location %q", status, loc)
		}
	}
	status, page := connectFlow(t, fake, signLink(t, base, time.Hour))
	if status != http.StatusOK || !strings.Contains(page, "anna") {
		t.Fatalf("a good link's flow: %d %s", status, page)
	}
	if rec := sc.storedAccountRecord("1234567", "anna"); rec.UserID != annaUser || !fake.RefreshTokenValid(rec.RefreshToken) {
		t.Errorf("anna's record after a signed link: %+v", rec.UserID)
	}
	// Refusals are logged with their cause, never the signature.
	lines := sc.logLines("connect link refused")
	if len(lines) == 0 {
		t.Error("no log line for refused links")
	}
	for _, l := range lines {
		if strings.Contains(l["cause"].(string), q.Get("sig")) {
			t.Errorf("log line holds the signature: %v", l)
		}
	}
}

// Without link_key a link that names an account is refused with 400
// (nothing reaches Fortnox), whatever it carries; a service-account
// activation (no account) stays an open link.
func TestConnectAccountLinkNeedsLinkKey(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	_, public, reload := connectSite(t, fake, "", "redirect_uri PUBLIC/fortnox/callback\naccount_type off")
	base := public + "/fortnox/connect?account=anna&tenant=1234567"
	refusedLink(t, "unsigned", base, http.StatusBadRequest, "does not accept links that connect a user account")
	refusedLink(t, "signed", signLink(t, base, time.Hour), http.StatusBadRequest, "does not accept links that connect a user account")
	if q := fake.LastAuthorizeQuery(); q != nil {
		t.Fatalf("a refused link reached Fortnox: %v", q)
	}
	// Service-account activation, with or without link_key.
	reload("", "redirect_uri PUBLIC/fortnox/callback")
	if status, _, loc := getPage(t, browser(t), public+"/fortnox/connect"); status != http.StatusFound || !strings.Contains(loc, "/oauth-v1/auth?") {
		t.Errorf("service activation without link_key: %d %q", status, loc)
	}
	t.Setenv("FORTNOX_TEST_LINK_KEY", testLinkKey)
	reload("", "redirect_uri PUBLIC/fortnox/callback\nlink_key {env.FORTNOX_TEST_LINK_KEY}")
	if status, _, loc := getPage(t, browser(t), public+"/fortnox/connect"); status != http.StatusFound || !strings.Contains(loc, "/oauth-v1/auth?") {
		t.Errorf("service activation with link_key (account_type service): %d %q", status, loc)
	}
}

// link_key must be 32 bytes or more, counted as text (a base64 key is not
// decoded); a missing placeholder is named.
func TestConnectLinkKeyConfig(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	t.Setenv("FORTNOX_TEST_CLIENT_ID", testClientID)
	t.Setenv("FORTNOX_TEST_CLIENT_SECRET", testClientSecret)
	for _, tc := range []struct{ key, want string }{
		{"short-key", "link_key must be at least 32 bytes"},
		{"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3", ""}, // 32 characters of base64 (24 bytes decoded): accepted as 32
		{"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY", "link_key must be at least 32 bytes"},
		{"{env.FORTNOX_TEST_NO_SUCH_KEY}", "link_key is empty"},
	} {
		sc := &sidecar{t: t, fake: fake, dir: t.TempDir()}
		sc.caddyfileTemplate = caddyfileTemplate{port: freePort(t), adminPort: freePort(t), tokenURL: fake.TokenURL(), upstream: fake.URL(),
			extraSites: "\nhttp://127.0.0.1:" + strconv.Itoa(freePort(t)) + " {\n\tfortnox_connect {\n\t\tclient_id {env.FORTNOX_TEST_CLIENT_ID}\n\t\ttoken_url " + fake.TokenURL() +
				"\n\t\tredirect_uri http://127.0.0.1/fortnox/callback\n\t\tscopes a\n\t\tcookie_secret " + testCookieSecret + "\n\t\tlink_key " + tc.key + "\n\t}\n}\n"}
		err := sc.load()
		if err == nil {
			_ = stopCaddy()
		}
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("link_key %q: %v, want %q", tc.key, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), tc.key) && !strings.HasPrefix(tc.key, "{") {
			t.Errorf("the error shows the key: %v", err)
		}
	}
}

// `caddy fortnox connect-link` prints a link the handler accepts, and
// names what is wrong otherwise.
func TestConnectLinkCommand(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizeAs("1234567", annaUser)
	sc, public := connectSidecar(t, fake, "account_type off")
	var out bytes.Buffer
	if err := printConnectLink(&out, testLinkKey, public+"/fortnox/connect", "1234567", "anna", 24*time.Hour, clk.Now()); err != nil {
		t.Fatal(err)
	}
	link := strings.TrimSpace(out.String())
	u, err := url.Parse(link)
	if err != nil || checkLink([]byte(testLinkKey), u.Query(), clk.Now()) != "" {
		t.Fatalf("the printed link does not verify: %s %v", link, err)
	}
	if exp, _ := strconv.ParseInt(u.Query().Get("expires"), 10, 64); time.Unix(exp, 0).Sub(clk.Now()) > 24*time.Hour || time.Unix(exp, 0).Sub(clk.Now()) < 24*time.Hour-time.Minute {
		t.Errorf("expires %s is not 24h ahead", u.Query().Get("expires"))
	}
	if strings.Contains(link, testLinkKey) {
		t.Error("the link holds the key")
	}
	status, page := connectFlow(t, fake, link)
	if status != http.StatusOK || !strings.Contains(page, "anna") {
		t.Fatalf("the printed link's flow: %d %s", status, page)
	}
	if rec := sc.storedAccountRecord("1234567", "anna"); rec.UserID != annaUser {
		t.Errorf("anna's record: user %q", rec.UserID)
	}

	out.Reset()
	if err := printConnectLink(&out, testLinkKey, defaultConnectLinkURL, "1234567", "anna", time.Hour, clk.Now()); err != nil || !strings.HasPrefix(out.String(), "/fortnox/connect?account=anna&expires=") {
		t.Errorf("default url: %q %v", out.String(), err)
	}
	for _, tc := range []struct {
		key, base, tenant, account string
		ttl                        time.Duration
		want                       string
	}{
		{"", defaultConnectLinkURL, "1234567", "anna", time.Hour, "FORTNOX_LINK_KEY is not set"},
		{"too-short", defaultConnectLinkURL, "1234567", "anna", time.Hour, "at least 32 bytes (it has 9)"},
		{testLinkKey, defaultConnectLinkURL, "", "anna", time.Hour, "--tenant and --account are both required"},
		{testLinkKey, defaultConnectLinkURL, "12ab", "anna", time.Hour, "is not a TenantId"},
		{testLinkKey, defaultConnectLinkURL, "1234567", "a b", time.Hour, "is not an account name"},
		{testLinkKey, defaultConnectLinkURL, "1234567", "anna", 169 * time.Hour, "longer than a link may live"},
		{testLinkKey, defaultConnectLinkURL, "1234567", "anna", 0, "must be positive"},
		{testLinkKey, "https://x.example/fortnox/connect?sig=1", "1234567", "anna", time.Hour, "already has sig="},
		{testLinkKey, "ftp://x.example/c", "1234567", "anna", time.Hour, "must be the connect path"},
	} {
		out.Reset()
		err := printConnectLink(&out, tc.key, tc.base, tc.tenant, tc.account, tc.ttl, clk.Now())
		if err == nil || !strings.Contains(err.Error(), tc.want) || out.Len() != 0 {
			t.Errorf("%+v: %v, printed %q; want %q", tc, err, out.String(), tc.want)
		}
		if err != nil && tc.key != "" && strings.Contains(err.Error(), tc.key) {
			t.Errorf("the error shows the key: %v", err)
		}
	}
	// The command is registered under `caddy fortnox`.
	cmd := connectLinkCommand()
	if cmd.Flags().Lookup("ttl") == nil || cmd.Flags().Lookup("url") == nil || !strings.HasPrefix(cmd.Use, "connect-link") {
		t.Errorf("command %q", cmd.Use)
	}
}

// The vector in docs/configuration.md, which the Python and Node examples
// there print, is what the handler computes and accepts.
func TestConnectLinkDocsVector(t *testing.T) {
	doc, err := os.ReadFile("docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	field := func(name string) string {
		m := regexp.MustCompile(`(?m)^` + name + `:\s+(.+)$`).FindSubmatch(doc)
		if m == nil {
			t.Fatalf("docs/configuration.md has no %q line in the link vector", name)
		}
		return strings.TrimSpace(string(m[1]))
	}
	key, signed, sig := field("key"), field("signed"), field("sig")
	q := url.Values{"account": {"anna.s@example.se"}, "tenant": {"1234567"}, "from": {"settings page (Q1) *~"}, "expires": {"1767225600"}}
	if q.Encode() != signed {
		t.Errorf("docs' signed text %q, Go encodes %q", signed, q.Encode())
	}
	if got := linkSignature([]byte(key), q); got != sig {
		t.Errorf("docs' sig %s, the handler computes %s", sig, got)
	}
	parsed, err := url.ParseQuery(signed + "&sig=" + sig)
	if err != nil {
		t.Fatal(err)
	}
	if p := checkLink([]byte(key), parsed, time.Unix(1767225600-60, 0)); p != "" {
		t.Errorf("the docs' link is refused a minute before it expires: %s", p)
	}
}
