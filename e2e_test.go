package fortnox

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// Each request reaches Fortnox with a token for exactly its own tenant and
// client, even with many tenants interleaved under concurrency.
func TestEachRequestCarriesItsOwnTenantsToken(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	tenants := []string{"1234567", "7654321", "5550001", "5550002"}
	for _, tn := range tenants {
		fake.GrantConsent(testClientID, tn)
	}
	sc := startSidecar(t, fake, "tenant acme 1234567\nrate_limit off")

	var wg sync.WaitGroup
	var failures atomic.Int64
	for i := range 400 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tenant := tenants[i%len(tenants)]
			sent := tenant
			if tenant == "1234567" && i%8 == 0 {
				sent = "acme" // the alias must reach the same tenant
			}
			status, body, _ := sc.get("/3/echo?for="+tenant, sent)
			if status != http.StatusOK {
				failures.Add(1)
				t.Errorf("request for %s: status %d: %s", tenant, status, body)
			}
		}()
	}
	wg.Wait()
	if failures.Load() > 0 {
		t.FailNow()
	}
	// The fake read the tenant and client from the token itself.
	reqs := fake.APIRequests()
	if len(reqs) != 400 {
		t.Fatalf("fake saw %d requests, want 400", len(reqs))
	}
	for _, r := range reqs {
		q, _ := url.ParseQuery(r.RawQuery)
		if r.Tenant != q.Get("for") || r.ClientID != testClientID {
			t.Fatalf("request for tenant %s reached Fortnox with a token for tenant %s, client %s", q.Get("for"), r.Tenant, r.ClientID)
		}
	}
	for _, tn := range tenants {
		if n := fake.TokenRequests("client_credentials", tn); n != 1 {
			t.Errorf("tenant %s: %d token requests, want 1", tn, n)
		}
	}
	if n := fake.Unauthorized(""); n != 0 {
		t.Errorf("fake answered 401 %d times", n)
	}
}

// 200 concurrent first requests for one tenant make one token request.
func TestColdStartMakesOneTokenRequest(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.SetFault(fakefortnox.Fault{Delay: 200 * time.Millisecond}) // so all 200 arrive while it is in flight
	sc := startSidecar(t, fake, "rate_limit off")

	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			status, body, _ := sc.get("/3/companyinformation", "1234567")
			if status != http.StatusOK || companyNumber(t, body) != "1234567" {
				t.Errorf("status %d: %s", status, body)
			}
		}()
	}
	close(start)
	wg.Wait()
	if n := fake.TokenRequests("", ""); n != 1 {
		t.Errorf("%d token requests, want 1", n)
	}
	if n := fake.MaxConcurrentTokenRequests(); n != 1 {
		t.Errorf("%d token requests in flight at once, want 1", n)
	}
}

// Under steady traffic across several token lifetimes, tokens are refreshed
// ahead in the background: no 401, and no request waits for the token
// endpoint after the very first.
func TestRefreshAheadKeepsTrafficOffTheTokenEndpoint(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1, TokenLifetime: time.Minute})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "refresh_before 20s")
	m := sc.manager()

	// 60s tokens refreshed 20s before expiry: a refresh every 40s. Walk
	// five lifetimes in 5s steps with traffic at every step.
	for step := range 60 {
		for range 3 {
			status, body, _ := sc.get("/3/companyinformation", "1234567")
			if status != http.StatusOK {
				t.Fatalf("step %d: status %d: %s", step, status, body)
			}
		}
		// Let a background refresh started by this step finish before the
		// clock moves on, as it would in real time.
		eventually(t, 5*time.Second, "background refresh", func() bool {
			v, ok := m.Cache.Get("1234567")
			return ok && !v.(*tokens.Token).Refreshing.Load()
		})
		advance(fake, 5*time.Second)
	}
	if n := fake.Unauthorized(""); n != 0 {
		t.Errorf("fake answered 401 %d times", n)
	}
	if n := m.Misses.Load(); n != 1 {
		t.Errorf("%d requests waited for a token, want only the first", n)
	}
	// 300s of tokens refreshed every 40s: 1 + 7 token requests.
	if n := fake.TokenRequests("client_credentials", "1234567"); n < 6 || n > 9 {
		t.Errorf("%d token requests over five lifetimes, want about 8", n)
	}
}

// A config reload keeps the cached tokens.
func TestConfigReloadKeepsTokens(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "")
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("status %d: %s", status, body)
	}
	sc.options = "tenant acme 1234567"
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	status, body, _ := sc.get("/3/companyinformation", "acme")
	if status != http.StatusOK || companyNumber(t, body) != "1234567" {
		t.Fatalf("after reload: status %d: %s", status, body)
	}
	if n := fake.TokenRequests("", ""); n != 1 {
		t.Errorf("%d token requests across a reload, want 1", n)
	}
}

// The app's own Authorization and the tenant header never reach Fortnox.
func TestClientHeadersAreNotForwarded(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "tenant_from_token")
	appToken := "Bearer " + fakeJWT(`{"tenantId":1234567}`)

	for _, h := range []http.Header{
		{"Authorization": {"Bearer app-own-token"}, DefaultTenantHeader: {"1234567"}},
		{"Authorization": {appToken}}, // the legacy path: tenant read from the app's token
	} {
		status, body, _ := sc.do(http.MethodGet, "/3/companyinformation", "", nil, h)
		if status != http.StatusOK {
			t.Fatalf("status %d: %s", status, body)
		}
	}
	for _, r := range fake.APIRequests() {
		if v := r.Header.Values(DefaultTenantHeader); len(v) != 0 {
			t.Errorf("tenant header forwarded: %q", v)
		}
		auth := r.Header.Values("Authorization")
		if len(auth) != 1 || strings.Contains(auth[0], "app-own-token") || auth[0] == appToken {
			t.Errorf("Authorization reaching Fortnox is not only ours: %d values", len(auth))
		}
	}
}

// Every row of the DESIGN's error table: status, JSON body, Retry-After,
// and no secret in the answer.
func TestErrorAnswers(t *testing.T) {
	garbage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		_, _ = w.Write([]byte("<html>maintenance</html>"))
	}))
	defer garbage.Close()

	tests := []struct {
		name       string
		options    string
		tokenURL   string // "" = the fake's
		setup      func(*fakefortnox.Server)
		header     http.Header
		tenant     string
		wantStatus int
		wantCode   string
		wantRetry  bool
		wantInMsg  string
	}{
		{name: "no tenant header", wantStatus: 400, wantCode: "missing_tenant", wantInMsg: "X-Fortnox-Tenant"},
		{name: "tenant header not a TenantId", tenant: "acme", wantStatus: 400, wantCode: "invalid_tenant", wantInMsg: "alias"},
		{name: "two tenant headers", header: http.Header{DefaultTenantHeader: {"1234567", "7654321"}}, wantStatus: 400, wantCode: "ambiguous_tenant"},
		{name: "tenant not listed", options: "tenant 7654321\nonly_listed_tenants", tenant: "1234567", wantStatus: 403, wantCode: "tenant_not_allowed", wantInMsg: "only_listed_tenants"},
		{name: "no consent", tenant: "1111111", wantStatus: 403, wantCode: "tenant_not_authorized", wantInMsg: "authorize"},
		{name: "no consent, answered 401", tenant: "1111111", setup: func(f *fakefortnox.Server) { f.SetNoConsentAnswer(401, "unauthorized_client") }, wantStatus: 403, wantCode: "tenant_not_authorized"},
		{name: "no consent, answered 403 not JSON", tenant: "1111111", setup: func(f *fakefortnox.Server) { f.SetNoConsentAnswer(403, "") }, wantStatus: 403, wantCode: "tenant_not_authorized"},
		{name: "wrong client secret", tenant: "1234567", setup: func(f *fakefortnox.Server) { f.AddClient(testClientID, "another-secret") }, wantStatus: 502, wantCode: "invalid_client_credentials", wantInMsg: "client_secret"},
		{name: "unreadable token answer", tenant: "1234567", tokenURL: garbage.URL, wantStatus: 502, wantCode: "bad_token_response"},
		{name: "token endpoint down", tenant: "1234567", setup: func(f *fakefortnox.Server) { f.SetFault(fakefortnox.Fault{Down: true}) }, wantStatus: 503, wantCode: "token_endpoint_unavailable", wantRetry: true},
		{name: "token endpoint 500", tenant: "1234567", setup: func(f *fakefortnox.Server) { f.SetFault(fakefortnox.Fault{Status: 500}) }, wantStatus: 503, wantCode: "token_endpoint_unavailable", wantRetry: true},
		{name: "token endpoint 429", tenant: "1234567", setup: func(f *fakefortnox.Server) { f.SetFault(fakefortnox.Fault{Status: 429}) }, wantStatus: 503, wantCode: "token_endpoint_unavailable", wantRetry: true},
		{name: "token endpoint too slow", options: "token_timeout 200ms", tenant: "1234567", setup: func(f *fakefortnox.Server) { f.SetFault(fakefortnox.Fault{Delay: 2 * time.Second}) }, wantStatus: 503, wantCode: "token_endpoint_unavailable", wantRetry: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := startFake(t, fakefortnox.Options{RateLimit: -1})
			fake.GrantConsent(testClientID, "1234567")
			if tt.setup != nil {
				tt.setup(fake)
			}
			options := tt.options
			if tt.tokenURL != "" {
				options += "\ntoken_url " + tt.tokenURL
			}
			sc := startSidecar(t, fake, options)
			status, body, resp := sc.do(http.MethodGet, "/3/companyinformation", tt.tenant, nil, tt.header)
			if status != tt.wantStatus {
				t.Fatalf("status %d, want %d: %s", status, tt.wantStatus, body)
			}
			e := errorAnswer(t, resp, body)
			if e.Error != tt.wantCode {
				t.Errorf("error %q, want %q", e.Error, tt.wantCode)
			}
			if !strings.Contains(e.Message, tt.wantInMsg) {
				t.Errorf("message %q does not mention %q", e.Message, tt.wantInMsg)
			}
			ra := resp.Header.Get("Retry-After")
			if secs, err := strconv.Atoi(ra); tt.wantRetry && (err != nil || secs < 1) {
				t.Errorf("Retry-After = %q, want whole seconds >= 1", ra)
			} else if !tt.wantRetry && ra != "" {
				t.Errorf("unexpected Retry-After %q", ra)
			}
			if n := fake.APICalls(""); n != 0 {
				t.Errorf("%d requests reached the API", n)
			}
		})
	}
}

// A token endpoint that fails is not asked again on every request: the
// tenant backs off, and recovers by itself once the endpoint is back.
func TestTokenEndpointFailureBacksOff(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.SetFault(fakefortnox.Fault{Status: 500})
	sc := startSidecar(t, fake, "")
	for i := range 50 {
		status, body, resp := sc.get("/3/companyinformation", "1234567")
		if status != http.StatusServiceUnavailable {
			t.Fatalf("request %d: status %d: %s", i, status, body)
		}
		errorAnswer(t, resp, body)
	}
	if n := fake.TokenRequests("", ""); n > 2 {
		t.Errorf("%d token requests for 50 app requests, want at most 2 (backoff)", n)
	}
	fake.ClearFault()
	advance(fake, 2*time.Minute) // past the longest backoff step
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("after recovery: status %d: %s", status, body)
	}
	// The tenant never had a token, so the line does not name it (a client
	// may have made it up: see TestMadeUpNamesDoNotFloodTheLog).
	if lines := sc.logLines("token request failed"); len(lines) == 0 || lines[0]["outcome"] != "token_endpoint_unavailable" || lines[0]["tenant"] != nil {
		t.Errorf("failure not logged once, without the tenant it does not know: %v", lines)
	}
}

// A caller that gives up does not cancel the token request others wait for.
func TestCallerThatGivesUpDoesNotCancelOthers(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.SetFault(fakefortnox.Fault{Delay: 500 * time.Millisecond})
	sc := startSidecar(t, fake, "")

	impatient := &http.Client{Timeout: 100 * time.Millisecond}
	req, _ := http.NewRequest(http.MethodGet, sc.url+"/3/companyinformation", nil)
	req.Header.Set(DefaultTenantHeader, "1234567")
	done := make(chan error, 1)
	go func() {
		resp, err := impatient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	time.Sleep(20 * time.Millisecond) // the impatient caller starts the token request
	status, body, _ := sc.get("/3/companyinformation", "1234567")
	if status != http.StatusOK {
		t.Fatalf("patient caller: status %d: %s", status, body)
	}
	if err := <-done; err == nil {
		t.Error("the impatient caller did not time out; the test proves nothing")
	}
	if n := fake.TokenRequests("", ""); n != 1 {
		t.Errorf("%d token requests, want 1", n)
	}
}

// A bad config is refused at load with an error naming the problem and
// never the secret.
func TestConfigErrors(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{})
	tests := []struct{ options, env, want string }{
		{options: "token_url ftp://x", want: `token_url "ftp://x" is not an http(s) URL`},
		{options: "tenant_header Authorization", want: "tenant_header"},
		{options: "only_listed_tenants", want: "no tenant is listed"},
		{env: "", want: "client_secret is empty: its placeholder {env.FORTNOX_TEST_CLIENT_SECRET} resolved to nothing"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			sc := &sidecar{t: t, fake: fake, dir: t.TempDir()}
			sc.caddyfileTemplate = caddyfileTemplate{port: freePort(t), adminPort: freePort(t), tokenURL: fake.TokenURL(), upstream: fake.URL(), options: tt.options}
			t.Setenv("FORTNOX_TEST_CLIENT_ID", testClientID)
			secret := testClientSecret
			if tt.options == "" {
				secret = tt.env
			}
			t.Setenv("FORTNOX_TEST_CLIENT_SECRET", secret)
			err := sc.load()
			if err == nil {
				t.Fatal("config loaded, want an error")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not say %q", err, tt.want)
			}
			if strings.Contains(err.Error(), testClientSecret) {
				t.Errorf("error holds the secret: %v", err)
			}
		})
	}
}

func ExampleHandler_errorBody() {
	rec := httptest.NewRecorder()
	writeJSONError(rec, 503, "token_endpoint_unavailable", "Retry later.", 2500*time.Millisecond)
	fmt.Print(rec.Code, " ", rec.Header().Get("Retry-After"), " ", rec.Body.String())
	// Output: 503 3 {"error":"token_endpoint_unavailable","message":"Retry later.","ErrorInformation":{"error":1,"message":"token_endpoint_unavailable: Retry later.","code":9100203}}
}

// A cold start of 1,000 concurrent first requests spread over 100 tenants
// makes exactly 100 token requests.
func TestColdStartOverManyTenants(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	var tenants []string
	for i := range 100 {
		tn := strconv.Itoa(3000000 + i)
		tenants = append(tenants, tn)
		fake.GrantConsent(testClientID, tn)
	}
	fake.SetFault(fakefortnox.Fault{Delay: 100 * time.Millisecond})
	sc := startSidecar(t, fake, "rate_limit off")
	var wg sync.WaitGroup
	start := make(chan struct{})
	var failures atomic.Int64
	for i := range 1000 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			tn := tenants[i%len(tenants)]
			if status, body, _ := sc.get("/3/companyinformation", tn); status != http.StatusOK || companyNumber(t, body) != tn {
				failures.Add(1)
			}
		}()
	}
	close(start)
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Errorf("%d requests failed", n)
	}
	if n := fake.TokenRequests("", ""); n != 100 {
		t.Errorf("%d token requests for 100 tenants, want 100", n)
	}
}

// A config that fails to load leaves nothing behind: the running config
// keeps its own client secret, storage and logger.
func TestFailedReloadLeavesSettingsAlone(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.GrantConsent(testClientID, "7654321")
	sc := startSidecar(t, fake, "rate_limit off")
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	// The new config has another secret and a webhook that cannot load.
	t.Setenv("FORTNOX_TEST_CLIENT_SECRET", "a-secret-that-never-goes-live")
	sc.extraSites = fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\tfortnox_webhook {\n\t\tclient_id x\n\t\tsecret s\n\t\talgorithm md5\n\t}\n}\n", freePort(t))
	if err := sc.load(); err == nil || !strings.Contains(err.Error(), "md5") {
		t.Fatalf("the broken config loaded: %v", err)
	}
	// A tenant the running config has not seen yet needs a token request:
	// it must be made with the running config's secret.
	if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusOK {
		t.Fatalf("after a failed reload: %d %s", status, body)
	}
	if n := fake.TokenErrors("invalid_client"); n != 0 {
		t.Errorf("%d token requests with the failed config's secret", n)
	}
}
