package fortnox

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// mintToken gets a real access token for tenant from the fake's token
// endpoint (client credentials, as Fortnox is asked).
func mintToken(t *testing.T, fake *fakefortnox.Server, tenant string) string {
	t.Helper()
	fake.GrantConsent(testClientID, tenant)
	req, err := http.NewRequest(http.MethodPost, fake.TokenURL(), strings.NewReader("grant_type=client_credentials"))
	if err != nil {
		t.Fatal(err)
	}
	req.SetBasicAuth(testClientID, testClientSecret)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("TenantId", tenant)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var answer struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&answer); err != nil || resp.StatusCode != http.StatusOK || answer.AccessToken == "" {
		t.Fatalf("minting a token: %d, %v", resp.StatusCode, err)
	}
	return answer.AccessToken
}

func TestCommandTenantID(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{})
	tok := mintToken(t, fake, "1234567")
	for _, tc := range []struct{ arg, stdin string }{
		{tok, ""},
		{"-", tok + "\n"},
		{"-", "Bearer " + tok},
	} {
		var out bytes.Buffer
		if err := printTenantID(&out, strings.NewReader(tc.stdin), tc.arg); err != nil {
			t.Fatal(err)
		}
		got := out.String()
		for _, want := range []string{"tenantId:  1234567\n", "clientId:  " + testClientID, "expires:", "valid for"} {
			if !strings.Contains(got, want) {
				t.Errorf("output lacks %q:\n%s", want, got)
			}
		}
		if strings.Contains(got, tok) || strings.Contains(got, tok[len(tok)-20:]) {
			t.Error("the output holds the token")
		}
	}
	for _, bad := range []struct{ arg, want string }{
		{"not-a-token", "not a JWT"},
		{"a.%%%.c", "not base64url"},
		{fakeJWT(`{"clientId":"x"}`), "no tenantId claim"},
		{fakeJWT(`{"tenantId":"abc"}`), "not a TenantId"},
		{"-", "no token given"},
	} {
		err := printTenantID(&bytes.Buffer{}, strings.NewReader(""), bad.arg)
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: error %v, want %q", bad.arg, err, bad.want)
		}
	}
}

// A token's claims are whatever its maker wrote: printed raw, a claim could
// clear the screen, move the cursor, or forge a line such as a different
// tenantId. Issue 9 item 13.
func TestCommandTenantIDEscapesClaims(t *testing.T) {
	tok := fakeJWT(`{"tenantId":1234567,"clientId":"evil\u001b[2J\u001b[H","sub":"x\ntenantId:  7654321","scope":"a\rb\u0007","iss":"\u202egnp.exe","userId":"u\u0000\u009b"}`)
	var out bytes.Buffer
	if err := printTenantID(&out, strings.NewReader(""), tok); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, c := range []string{"\x1b", "\r", "\a", "\x00", "\u202e", "\u009b"} {
		if strings.Contains(got, c) {
			t.Errorf("the output holds the control character %q:\n%q", c, got)
		}
	}
	if n := strings.Count(got, "\n"); n != 6 {
		t.Errorf("%d lines, want 6 (a newline in a claim must not start a line):\n%s", n, got)
	}
	if strings.Count("\n"+got, "\ntenantId:") != 1 {
		t.Errorf("a forged tenantId line:\n%s", got)
	}
	for _, want := range []string{
		`clientId:  evil\x1b[2J\x1b[H` + "\n",
		`sub:       x\ntenantId:  7654321` + "\n",
		`scope:     a\rb\a` + "\n",
		`issuer:    \u202egnp.exe` + "\n",
		`userId:    u\x00\u009b` + "\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
}

func TestEscapeControl(t *testing.T) {
	for in, want := range map[string]string{
		"plain text, åäö 日本":  "plain text, åäö 日本",
		"a\tb":                `a\tb`,
		"\x7f":                `\x7f`,
		"bad \xff utf8":       `bad \xff utf8`,
		"\u2066isolate\u2069": `\u2066isolate\u2069`,
	} {
		if got := escapeControl(in); got != want {
			t.Errorf("escapeControl(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCommandCompanyInfo(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{})
	tok := mintToken(t, fake, "7654321")
	var out bytes.Buffer
	if err := printCompanyInfo(context.Background(), &out, strings.NewReader(""), tok, fake.URL()); err != nil {
		t.Fatal(err)
	}
	if out.String() != "DatabaseNumber (TenantId): 7654321\n" {
		t.Errorf("output %q", out.String())
	}
	if err := printCompanyInfo(context.Background(), &out, strings.NewReader(""), tok, "http://api.example.com"); err == nil || !strings.Contains(err.Error(), "must be an https URL") {
		t.Errorf("plain http to another host: %v", err)
	}
	err := printCompanyInfo(context.Background(), &out, strings.NewReader(""), fakeJWT(`{"tenantId":1}`), fake.URL())
	if err == nil || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), "not valid") {
		t.Errorf("forged token: %v", err)
	}
}

// When neither endpoint gives a DatabaseNumber, the error names each path
// tried and what it answered, so a missing scope is told from a bad token.
func TestCommandCompanyInfoNamesEveryPathTried(t *testing.T) {
	var asked []string
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked = append(asked, r.URL.Path)
		switch r.URL.Path {
		case "/3/companyinformation":
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprint(w, `{"ErrorInformation":{"error":1,"message":"Saknar behörighet\u001b[2J för scope","code":2000663}}`)
		case "/3/settings/company":
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprint(w, `<html>oops</html>`)
		}
	}))
	defer api.Close()
	err := printCompanyInfo(context.Background(), &bytes.Buffer{}, strings.NewReader(""), "some.token.here", api.URL)
	if err == nil {
		t.Fatal("no error")
	}
	msg := err.Error()
	for _, want := range []string{
		"/3/companyinformation: Fortnox answered 403 (the token lacks this endpoint's scope): Saknar behörighet\\x1b[2J för scope",
		"/3/settings/company: Fortnox answered 500",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	if strings.Contains(msg, "\x1b") || strings.Contains(msg, "some.token.here") {
		t.Errorf("error holds a control character or the token: %q", msg)
	}
	if len(asked) != 2 {
		t.Errorf("asked %v, want both paths", asked)
	}

	// Nothing listening: each path says so.
	dead := httptest.NewServer(http.NotFoundHandler())
	deadURL := dead.URL
	dead.Close()
	err = printCompanyInfo(context.Background(), &bytes.Buffer{}, strings.NewReader(""), "some.token.here", deadURL)
	if err == nil || strings.Count(err.Error(), "connection refused") != 2 ||
		!strings.Contains(err.Error(), "/3/companyinformation: ") || !strings.Contains(err.Error(), "/3/settings/company: ") {
		t.Errorf("nothing listening: %v", err)
	}
}

// The admin API's answer for three kinds of tenants (client credentials,
// refresh token, failing) and one with named user accounts, with the
// fields each may lack or hold null. Never a token: the API has none.
const tenantsJSON = `[
  {"tenant":"7654321","mode":"refresh_token","token_expires_at":"2026-03-01T09:52:30Z","has_refresh_token":true,"last_error":null,"refresh_token_age_seconds":1036800,"consent_revoked":false,"accounts":[]},
  {"tenant":"12345678","mode":"none","token_expires_at":null,"has_refresh_token":false,"last_error":"tenant_not_authorized: Fortnox gave no token for tenant 12345678: no service-account consent.\nSecond line","refresh_token_age_seconds":null,"consent_revoked":true},
  {"tenant":"1234567","mode":"client_credentials","token_expires_at":"2026-03-01T09:00:00Z","has_refresh_token":false,"last_error":null,
   "accounts":[
     {"name":"zoe","user_id":"42","token_expires_at":"2026-03-01T08:57:00Z","has_refresh_token":true,"last_error":"refresh_token_rejected: invalid_grant","refresh_token_age_seconds":7200},
     {"name":"anna","user_id":7,"token_expires_at":"2026-03-01T10:40:00Z","has_refresh_token":true,"last_error":null,"refresh_token_age_seconds":null}
   ]},
  {"tenant":"5550001","mode":"client_credentials"}
]`

var tenantsNow = time.Date(2026, 3, 1, 9, 0, 30, 0, time.UTC)

const tenantsTable = `TENANT    MODE                    EXPIRES          LAST ERROR                               REFRESH TOKEN
1234567   client_credentials      expired 30s ago  -                                        no
1234567   account anna (user 7)   in 1h39m         -                                        yes
1234567   account zoe (user 42)   expired 3m ago   refresh_token_rejected: invalid_grant    yes (2h)
5550001   client_credentials      -                -                                        -
7654321   refresh_token           in 52m           -                                        yes (12d)
12345678  none (consent revoked)  -                tenant_not_authorized: Fortnox gave no…  no
`

func TestPrintTenants(t *testing.T) {
	var out bytes.Buffer
	if err := printTenants(&out, []byte(tenantsJSON), tenantsNow); err != nil {
		t.Fatal(err)
	}
	if got := out.String(); got != tenantsTable {
		t.Errorf("table:\n%s\nwant:\n%s", got, tenantsTable)
	}

	out.Reset()
	if err := printTenants(&out, []byte(`[]`), tenantsNow); err != nil || !strings.HasPrefix(out.String(), "No tenants known yet") {
		t.Errorf("no tenants: %q, %v", out.String(), err)
	}
	if err := printTenants(&out, []byte(`{"error":"x"}`), tenantsNow); err == nil {
		t.Error("an object instead of an array: no error")
	}
	// Fields the table does not know are never printed: even a sidecar
	// that wrongly sent a token would not get it onto the screen.
	out.Reset()
	if err := printTenants(&out, []byte(`[{"tenant":"1","mode":"none","access_token":"eyJsecret","refresh_token":"deadbeef"}]`), tenantsNow); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out.String(), "eyJsecret") || strings.Contains(out.String(), "deadbeef") {
		t.Errorf("a token reached the table:\n%s", out.String())
	}
	// Text from outside (a last_error quoting Fortnox) is escaped.
	out.Reset()
	if err := printTenants(&out, []byte(`[{"tenant":"1","mode":"none","last_error":"bad\u001b[2Jthing"}]`), tenantsNow); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out.String(), "\x1b") || !strings.Contains(out.String(), `bad\x1b[2Jthing`) {
		t.Errorf("last_error not escaped: %q", out.String())
	}
}

func TestShortDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                               "0s",
		59 * time.Second:                "59s",
		52*time.Minute + 59*time.Second: "52m",
		time.Hour:                       "1h",
		5*time.Hour + 12*time.Minute:    "5h12m",
		47 * time.Hour:                  "47h",
		12*24*time.Hour + time.Hour:     "12d",
	} {
		if got := shortDuration(d); got != want {
			t.Errorf("shortDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

// adminStandIn serves GET /fortnox/tenants as Caddy's admin API would.
func adminStandIn(t *testing.T) (addr string, queries *[]url.Values) {
	t.Helper()
	var seen []url.Values
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || r.URL.Path != "/fortnox/tenants" {
			http.Error(w, `{"error":"no such route"}`, http.StatusNotFound)
			return
		}
		seen = append(seen, r.URL.Query())
		if r.URL.Query().Get("client_id") == "unknown" {
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"error":"no fortnox handler with client id \"unknown\" is loaded"}`)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, tenantsJSON)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), &seen
}

func TestCommandTenants(t *testing.T) {
	addr, queries := adminStandIn(t)
	ctx := context.Background()

	var out bytes.Buffer
	if err := runTenants(ctx, &out, tenantsFlags{address: addr}, tenantsNow); err != nil {
		t.Fatal(err)
	}
	if out.String() != tenantsTable {
		t.Errorf("table:\n%s\nwant:\n%s", out.String(), tenantsTable)
	}

	out.Reset()
	if err := runTenants(ctx, &out, tenantsFlags{address: addr, json: true, clientID: "client b"}, tenantsNow); err != nil {
		t.Fatal(err)
	}
	if out.String() != tenantsJSON+"\n" {
		t.Errorf("--json printed:\n%s", out.String())
	}
	if q := (*queries)[len(*queries)-1]; q.Get("client_id") != "client b" {
		t.Errorf("--client-id sent as %v", q)
	}

	err := runTenants(ctx, &out, tenantsFlags{address: addr, clientID: "unknown"}, tenantsNow)
	if err == nil || !strings.Contains(err.Error(), "refused GET /fortnox/tenants?client_id=unknown") || !strings.Contains(err.Error(), `no fortnox handler with client id \"unknown\"`) {
		t.Errorf("unknown client id: %v", err)
	}
}

// With the admin endpoint unreachable, the error names the address it
// tried and says what to do.
func TestCommandTenantsUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	err = runTenants(context.Background(), &bytes.Buffer{}, tenantsFlags{address: addr}, tenantsNow)
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"cannot reach Caddy's admin API at " + addr, "connection refused", "--address"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
}

// Without --address, the address comes from --config, as for `caddy stop`.
func TestCommandTenantsAddressFromConfig(t *testing.T) {
	addr, _ := adminStandIn(t)
	cfg := t.TempDir() + "/Caddyfile"
	if err := os.WriteFile(cfg, []byte("{\n\tadmin "+addr+"\n}\nhttp://:0 {\n\trespond ok\n}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := runTenants(context.Background(), &out, tenantsFlags{config: cfg}, tenantsNow); err != nil {
		t.Fatal(err)
	}
	if out.String() != tenantsTable {
		t.Errorf("table:\n%s", out.String())
	}
}
