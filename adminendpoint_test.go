package fortnox

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// The admin endpoint is the operator's, never the app's: no message the
// app receives sends it there. Where a refresh token is the remedy, the
// message names the hand-over route (fortnox_handover) instead. The error
// codes are those of DESIGN's table.
func TestAppMessagesNeverPointAtTheAdminAPI(t *testing.T) {
	codes := map[tokens.TokenFailure]string{
		tokens.FailNoConsent: "tenant_not_authorized", tokens.FailGrantRejected: "refresh_token_rejected",
		tokens.FailBadClient: "invalid_client_credentials", tokens.FailBadAnswer: "bad_token_response",
		tokens.FailUnavailable: "token_endpoint_unavailable", tokens.FailStorage: "token_storage_unavailable",
		tokens.FailConsentRevoked: "consent_revoked", tokens.FailTenantMismatch: "tenant_mismatch",
		tokens.FailRecordMisplaced: "tenant_mismatch", tokens.FailAccountNotAuthorized: "account_not_authorized",
		tokens.FailUserMismatch: "account_user_mismatch", tokens.FailRefreshInProgress: "refresh_in_progress",
	}
	handover := map[tokens.TokenFailure]bool{tokens.FailNoConsent: true, tokens.FailGrantRejected: true, tokens.FailTenantMismatch: true, tokens.FailAccountNotAuthorized: true}
	for failure, code := range codes {
		for _, account := range []string{"", "anna"} {
			e := &tokens.Error{Failure: failure, Tenant: "1234567", Account: account, TokenTenant: "7654321", TokenUser: "2", WantUser: "1"}
			msg := e.Advice("1234567")
			if got := e.ErrorCode(); got != code {
				t.Errorf("failure %d: error %q, want %q", failure, got, code)
			}
			if strings.Contains(strings.ToLower(msg), "admin api") || strings.Contains(msg, "/fortnox/tenants") || strings.Contains(msg, "2019") {
				t.Errorf("%s (account %q) sends the app to the admin API: %s", code, account, msg)
			}
			if !handover[failure] || (failure == tokens.FailNoConsent && account != "") { // a service-account failure only
				continue
			}
			path := "/tenants/1234567/refresh_token"
			switch {
			case account != "":
				path = "/tenants/1234567/accounts/anna/refresh_token"
			case failure == tokens.FailAccountNotAuthorized:
				path = "/tenants/1234567/accounts/<name>/refresh_token"
			}
			want := "PUT " + path + " with {\"refresh_token\":\"…\"} on the sidecar's hand-over route (fortnox_handover)"
			if !strings.Contains(msg, want) {
				t.Errorf("%s (account %q) does not name the hand-over route:\n%s\nwant it to hold %s", code, account, msg, want)
			}
		}
	}

	// As the app reads it, over HTTP.
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	status, body, resp := sc.get("/3/companyinformation", "5550001")
	e := errorAnswer(t, resp, body)
	if status != http.StatusForbidden || e.Error != "tenant_not_authorized" ||
		!strings.Contains(e.Message, "PUT /tenants/5550001/refresh_token") || !strings.Contains(e.Message, "fortnox_handover") ||
		strings.Contains(strings.ToLower(string(body)), "admin api") {
		t.Errorf("no consent: %d %s, want 403 tenant_not_authorized naming the hand-over route", status, body)
	}
}

// socketSidecar is a sidecar whose admin endpoint is a unix socket in a
// directory only its user can open, as every shipped config has it. The
// path is short: a unix socket's must stay under about 100 bytes.
func socketSidecar(t *testing.T, fake *fakefortnox.Server) (*sidecar, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "fx")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "admin.sock")
	sc := startSidecar(t, fake, "")
	sc.adminListen = "unix/" + sock
	if err := sc.load(); err != nil {
		t.Fatalf("loading the config with the admin endpoint on %s: %v", sock, err)
	}
	return sc, "unix/" + sock
}

// `caddy fortnox tenants` finds an admin endpoint on a unix socket the way
// `caddy reload` does: --address, else --config, else CADDY_ADMIN, else
// ./Caddyfile; the earlier one wins.
func TestCommandFindsTheAdminSocket(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, addr := socketSidecar(t, fake)
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	if !strings.HasPrefix(addr, "unix//") {
		t.Fatalf("%q is not an absolute unix address", addr)
	}

	dir := t.TempDir()
	caddyfileWith := func(name, admin string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte("{\n\tadmin "+admin+"\n}\n\nhttp://127.0.0.1:0 {\n\trespond ok\n}\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	wrong := "unix/" + filepath.Join(dir, "nothing.sock")
	good := caddyfileWith("good.caddyfile", addr)
	bad := caddyfileWith("bad.caddyfile", wrong)
	t.Chdir(dir) // ./Caddyfile is looked for here

	for _, tc := range []struct {
		what      string
		flags     tenantsFlags
		env       string
		caddyfile string // the admin option of ./Caddyfile; none when empty
	}{
		{what: "--address", flags: tenantsFlags{address: addr}},
		{what: "--address over CADDY_ADMIN and ./Caddyfile", flags: tenantsFlags{address: addr}, env: wrong, caddyfile: wrong},
		{what: "--config", flags: tenantsFlags{config: good}},
		{what: "--config over CADDY_ADMIN", flags: tenantsFlags{config: good}, env: wrong},
		{what: "CADDY_ADMIN", env: addr},
		{what: "CADDY_ADMIN over ./Caddyfile", env: addr, caddyfile: wrong},
		{what: "./Caddyfile", caddyfile: addr},
	} {
		t.Setenv("CADDY_ADMIN", tc.env)
		os.Remove(filepath.Join(dir, "Caddyfile"))
		if tc.caddyfile != "" {
			caddyfileWith("Caddyfile", tc.caddyfile)
		}
		var out bytes.Buffer
		if err := runTenants(context.Background(), &out, tc.flags, time.Now()); err != nil {
			t.Errorf("%s: %v", tc.what, err)
			continue
		}
		if !regexp.MustCompile(`(?m)^1234567\s+client_credentials\s`).MatchString(out.String()) {
			t.Errorf("%s: printed\n%s", tc.what, out.String())
		}
	}

	// A wrong socket: the error names it and says what to pass.
	t.Setenv("CADDY_ADMIN", "")
	os.Remove(filepath.Join(dir, "Caddyfile"))
	err := runTenants(context.Background(), &bytes.Buffer{}, tenantsFlags{config: bad}, time.Now())
	if err == nil || !strings.Contains(err.Error(), "cannot reach Caddy's admin API at "+wrong) || !strings.Contains(err.Error(), "--address") {
		t.Errorf("a Caddyfile naming a socket nobody listens on: %v", err)
	}
}

// A Caddyfile with a fortnox block and the admin endpoint on TCP (set so,
// or left at Caddy's default) gets one warning from the adapter, which
// `caddy adapt` and `caddy run` print: what the app could do through it
// and how to move it. A unix socket, a file descriptor or `admin off` get
// none, and so does a Caddyfile without a fortnox block.
func TestAdminOnTCPWarning(t *testing.T) {
	site := func(port int) string {
		return fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\tbind 127.0.0.1\n\tfortnox {\n\t\tclient_id {env.FORTNOX_CLIENT_ID}\n\t\tclient_secret {env.FORTNOX_CLIENT_SECRET}\n\t}\n\treverse_proxy https://api.fortnox.se\n}\n", port)
	}
	twoSites := site(8080) + site(8081)
	for _, tc := range []struct {
		what, caddyfile string
		listen          string // the TCP address warned about; none when empty
	}{
		{"no admin option (Caddy's default)", strings.TrimPrefix(twoSites, "\n"), caddy.DefaultAdminListen},
		{"admin on a TCP address", "{\n\tadmin 127.0.0.1:9999\n}\n" + twoSites, "127.0.0.1:9999"},
		{"admin on every interface", "{\n\tadmin :9999\n}\n" + twoSites, ":9999"},
		{"admin with options only (Caddy's default address)", "{\n\tadmin {\n\t\tenforce_origin\n\t}\n}\n" + twoSites, caddy.DefaultAdminListen},
		{"admin on a unix socket", "{\n\tadmin unix//run/caddy-fortnox/admin.sock\n}\n" + twoSites, ""},
		{"admin on a relative unix socket with permissions", "{\n\tadmin \"unix/.demo/admin/admin.sock|0600\"\n}\n" + twoSites, ""},
		{"admin on a file descriptor", "{\n\tadmin fd/3\n}\n" + twoSites, ""},
		{"admin off", "{\n\tadmin off\n}\n" + twoSites, ""},
		{"no fortnox block", "{\n\tadmin 127.0.0.1:9999\n}\n\nhttp://127.0.0.1:8080 {\n\trespond ok\n}\n", ""},
	} {
		_, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(tc.caddyfile), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			t.Fatalf("%s: %v", tc.what, err)
		}
		var ours []caddyconfig.Warning
		for _, w := range warnings {
			if strings.Contains(w.Message, "admin endpoint") {
				ours = append(ours, w)
			} else {
				t.Errorf("%s: another warning: %s", tc.what, w)
			}
		}
		if tc.listen == "" {
			if len(ours) != 0 {
				t.Errorf("%s: warned %v", tc.what, ours)
			}
			continue
		}
		if len(ours) != 1 {
			t.Fatalf("%s: %d warnings about the admin endpoint, want 1: %v", tc.what, len(ours), ours)
		}
		w := ours[0]
		firstFortnox := strings.Count(tc.caddyfile[:strings.Index(tc.caddyfile, "fortnox {")], "\n") + 1
		if w.Directive != "fortnox" || w.File != "Caddyfile" || w.Line != firstFortnox {
			t.Errorf("%s: warning at %s:%d (%s), want Caddyfile:%d (fortnox)", tc.what, w.File, w.Line, w.Directive, firstFortnox)
		}
		for _, want := range []string{"listens on TCP (" + tc.listen + ")", "the app", "SSRF", "client secret", "tokens", "elsewhere", "admin unix//"} {
			if !strings.Contains(w.Message, want) {
				t.Errorf("%s: the warning lacks %q: %s", tc.what, want, w.Message)
			}
		}
	}

	// CADDY_ADMIN (read by Caddy at start into its default) counts when
	// the option is not set.
	defer func(d string) { caddy.DefaultAdminListen = d }(caddy.DefaultAdminListen)
	caddy.DefaultAdminListen = "unix//run/caddy-fortnox/admin.sock"
	if _, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(strings.TrimPrefix(twoSites, "\n")), map[string]any{"filename": "Caddyfile"}); err != nil || len(warnings) != 0 {
		t.Errorf("no admin option, CADDY_ADMIN on a unix socket: %v, %v", warnings, err)
	}
}

// With the admin endpoint on a socket, Prometheus scrapes a site of its
// own that runs Caddy's metrics handler (as Caddyfile.example and the
// Kubernetes example have it): the plugin's caddy_fortnox_* series are
// there, with what the sidecar did.
func TestMetricsOnTheirOwnListener(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	metricsPort := freePort(t)
	sc := startSidecar(t, fake, "")
	sc.extraSites = fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\tmetrics\n}\n", metricsPort)
	sc.adminListen = "off" // nothing on the admin endpoint to scrape
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the metrics site answered %d", resp.StatusCode)
	}
	// Counters are the process's: other tests may have added to them.
	for _, series := range []string{
		`caddy_fortnox_token_requests_total{grant="client_credentials",outcome="ok"}`,
		`caddy_fortnox_token_cache_lookups_total{result="miss"}`,
		"caddy_fortnox_tenants_cached",
	} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` [1-9]\d*$`).Match(body) {
			t.Errorf("the metrics site lacks %s with a count of at least 1", series)
		}
	}
	if strings.Contains(string(body), "1234567") || strings.Contains(string(body), testClientID) {
		t.Error("a metric names the tenant or the client")
	}
}
