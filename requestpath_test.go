package fortnox

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"go.uber.org/zap"
)

// testLogger is the logger of managers built outside Caddy in unit tests.
func testLogger(testing.TB) *zap.Logger { return zap.NewNop() }

// rawRequest sends a request exactly as written (headers and trailers the
// Go client would not send) and returns the answer.
func (s *sidecar) rawRequest(raw string) (int, string) {
	s.t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(s.url, "http://"))
	if err != nil {
		s.t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(conn, strings.ReplaceAll(raw, "\n", "\r\n")); err != nil {
		s.t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// With a slow token endpoint, requests waiting for a cold tenant's token
// must not spend the tenant's turns meanwhile: a turn is taken when the
// request can be sent. Fortnox answers no 429.
func TestTurnIsTakenWithTheTokenInHand(t *testing.T) {
	if testing.Short() {
		t.Skip("about 4 s of real time")
	}
	fake := startFake(t, fakefortnox.Options{RateLimit: 25, RateWindow: time.Second})
	fake.GrantConsent(testClientID, "1234567")
	fake.SetFault(fakefortnox.Fault{Delay: 800 * time.Millisecond})
	sc := startSidecar(t, fake, "rate_limit 25 1200ms\nmax_wait 10s")
	var wg sync.WaitGroup
	statuses := make(chan int, 60)
	for range 60 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, _, _ := sc.get("/3/companyinformation", "1234567")
			statuses <- status
		}()
	}
	wg.Wait()
	close(statuses)
	for status := range statuses {
		if status != http.StatusOK {
			t.Errorf("status %d", status)
		}
	}
	if n := fake.TooMany(""); n != 0 {
		t.Errorf("Fortnox answered 429 %d times", n)
	}
	if n := fake.APICalls("1234567"); n != 60 {
		t.Errorf("%d requests served, want 60", n)
	}
}

// An app's `Connection: Authorization` (or naming the tenant header) must
// not make reverse_proxy strip the injected token, which would make every
// such request a 401 that drops the tenant's token. Other Connection
// options keep working.
func TestConnectionHeaderCannotStripTheToken(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "")
	for i, conn := range []string{"Authorization", "X-Fortnox-Tenant, authorization", "Proxy-Authorization, X-Drop-Me, Authorization"} {
		status, body := sc.rawRequest(fmt.Sprintf("GET /3/companyinformation HTTP/1.1\nHost: 127.0.0.1\nX-Fortnox-Tenant: 1234567\nAuthorization: Bearer app-own-token\nProxy-Authorization: Basic YXBwOnNlY3JldA==\nX-Drop-Me: 1\nConnection: %s\n\n", conn))
		if status != http.StatusOK {
			t.Fatalf("Connection: %s: %d %s", conn, status, body)
		}
		reqs := fake.APIRequests()
		got := reqs[len(reqs)-1]
		if got.Tenant != "1234567" || got.Header.Get("Proxy-Authorization") != "" {
			t.Errorf("request %d reached Fortnox for tenant %q with Proxy-Authorization %q", i, got.Tenant, got.Header.Get("Proxy-Authorization"))
		}
		if strings.Contains(conn, "X-Drop-Me") && got.Header.Get("X-Drop-Me") != "" {
			t.Error("a header the app named in Connection was forwarded: hop-by-hop handling broke")
		}
	}
	if n := fake.Unauthorized(""); n != 0 {
		t.Errorf("%d requests reached Fortnox without the token", n)
	}
	if n := fake.TokenRequests("", ""); n != 1 {
		t.Errorf("%d token requests, want 1 (no token was dropped)", n)
	}
}

// Trailers of a chunked request cannot carry the app's own Authorization
// or a second tenant header through to Fortnox, whether the body is kept
// for a replay or streamed. Other trailers go through.
func TestTrailersCannotCarryOwnedHeaders(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	fake.GrantConsent(testClientID, "7654321")
	sc := startSidecar(t, fake, "replay_body_limit 1KiB")
	for _, size := range []int{10, 4000} {
		body := strings.Repeat("x", size)
		raw := fmt.Sprintf("POST /3/invoices HTTP/1.1\nHost: 127.0.0.1\nX-Fortnox-Tenant: 1234567\nTransfer-Encoding: chunked\nTrailer: Authorization, X-Fortnox-Tenant, X-Other\n\n%x\n%s\n0\nAuthorization: Bearer app-own-token\nX-Fortnox-Tenant: 7654321\nX-Fortnox-Account: anna\nX-Other: kept\n\n", size, body)
		status, answer := sc.rawRequest(raw)
		if status != http.StatusOK {
			t.Fatalf("%d-byte body: %d %s", size, status, answer)
		}
		reqs := fake.APIRequests()
		got := reqs[len(reqs)-1]
		if got.Tenant != "1234567" || len(got.Body) != size {
			t.Fatalf("%d-byte body reached Fortnox as tenant %s with %d bytes", size, got.Tenant, len(got.Body))
		}
		for _, owned := range []string{"Authorization", "X-Fortnox-Tenant", "X-Fortnox-Account"} {
			if v := got.Trailer.Get(owned); v != "" {
				t.Errorf("%d-byte body: trailer %s: %q reached Fortnox", size, owned, v)
			}
		}
		if got.Trailer.Get("X-Other") != "kept" {
			t.Errorf("%d-byte body: other trailers were lost (%v): the test cannot see trailers", size, got.Trailer)
		}
	}
}

// A path that always answers 401 (a wrong URL, a missing scope) does not
// turn each request into token requests: a 401 on a token minted seconds
// ago, or on the replay, passes through and keeps the token, and a
// subject's invalidations are bounded.
func Test401StormIsBounded(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "")
	sc.get("/3/companyinformation", "1234567")
	advance(fake, tokens.FreshTokenGrace)
	for i := range 10 {
		status, body, _ := sc.get("/3/always-401/x", "1234567")
		if status != http.StatusUnauthorized || !strings.Contains(string(body), "unauthorized") {
			t.Fatalf("request %d: %d %s: Fortnox's 401 must pass through", i, status, body)
		}
	}
	// The first 401 dropped the (then 10 s old) token and replayed once;
	// the replay's 401 and those on the new, fresh token kept it.
	if n := fake.TokenRequests("", ""); n != 2 {
		t.Errorf("%d token requests for 10 requests to a path that always answers 401, want 2", n)
	}
	// With time passing between them, at most 3 invalidations a minute.
	for range 10 {
		advance(fake, 11*time.Second)
		sc.get("/3/always-401/x", "1234567")
	}
	if n := fake.TokenRequests("", ""); n > 2+6 {
		t.Errorf("%d token requests after 10 more 401s over 110 s, want at most 8", n)
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Errorf("a good path afterwards: %d %s", status, body)
	}
}

// After a 401, a refresh-token tenant's token is dropped from the store as
// well as from memory (compare and invalidate), so that nothing reads the
// revoked token back: large POSTs (not replayable) after a revocation get
// one 401, then a new token, also in a process started afterwards.
func TestRefreshTokenTenantAfter401(t *testing.T) {
	for _, restart := range []bool{false, true} {
		t.Run(fmt.Sprintf("restart=%v", restart), func(t *testing.T) {
			fake := startFake(t, fakefortnox.Options{RateLimit: -1})
			sc := startSidecar(t, fake, "replay_body_limit 1KiB")
			sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
			if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
				t.Fatalf("%d %s", status, body)
			}
			advance(fake, tokens.FreshTokenGrace)
			revoked := sc.storedRecord("1234567").AccessToken
			fake.RevokeAccessTokens(testClientID, "1234567")
			big := strings.Repeat("y", 4096)
			post := func() int {
				status, _, _ := sc.do(http.MethodPost, "/3/invoices", "1234567", strings.NewReader(big), nil)
				return status
			}
			statuses := []int{post()}
			eventually(t, 5*time.Second, "the revoked token to leave the store", func() bool {
				return sc.storedRecord("1234567").AccessToken != revoked
			})
			if restart {
				caddyStop(t)
				if err := sc.load(); err != nil {
					t.Fatal(err)
				}
			}
			for range 3 {
				statuses = append(statuses, post())
			}
			if fmt.Sprint(statuses) != "[401 200 200 200]" {
				t.Errorf("statuses %v, want one 401 then the new token", statuses)
			}
			if n := fake.TokenErrors("invalid_grant"); n != 0 {
				t.Errorf("%d invalid_grant", n)
			}
		})
	}
}

// A replay never joins a token request that began before the 401 and so
// would hand back the token that just failed: it waits that one out and
// gets a new token.
func TestReplayDoesNotJoinAFlightThatReturnsTheFailedToken(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	m := tokens.NewManager(fake.TokenURL(), testClientID, clk)
	defer m.Destruct()
	m.Settings.Store(&tokens.Settings{Cred: tokens.Credentials{ClientID: testClientID, ClientSecret: testClientSecret}, RefreshBefore: time.Minute, TokenTimeout: 5 * time.Second, Logger: testLogger(t)})
	subj := tokens.Subject{Tenant: "1234567"}
	failed := m.CacheToken(subj, tokens.GrantClientCredentials, "the-failed-token", clk.Now().Add(-time.Minute), time.Hour, time.Minute)

	release := make(chan struct{})
	started := make(chan struct{})
	go m.Flights.Do(subj.Key(), func() (any, error) { // a flight that began before the 401
		close(started)
		<-release
		return failed, nil
	})
	<-started
	got := make(chan *tokens.Token, 1)
	go func() {
		t, err := m.WaitForToken(context.Background(), subj, failed)
		if err != nil {
			panic(err)
		}
		got <- t
	}()
	time.Sleep(50 * time.Millisecond) // the replay joins the old flight
	close(release)
	select {
	case tok := <-got:
		if tok == failed || tok.Bearer == failed.Bearer {
			t.Fatal("the replay got the token that just failed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no token")
	}
	if n := fake.TokenRequests("client_credentials", "1234567"); n != 1 {
		t.Errorf("%d token requests, want 1", n)
	}
}

// Fortnox's old auth headers (Access-Token, Client-Secret,
// Authorization-Code), which some SDKs still send on every request, never
// reach Fortnox: not as headers, not as trailers, and naming them in
// Connection changes nothing else.
func TestOldFortnoxAuthHeadersNeverPass(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "replay_body_limit 1KiB")
	old := "Access-Token: app-access-token\nclient-secret: app-client-secret\nAUTHORIZATION-CODE: app-code\n"
	lastRequest := func() fakefortnox.APIRequest {
		reqs := fake.APIRequests()
		return reqs[len(reqs)-1]
	}
	check := func(what string, got fakefortnox.APIRequest) {
		t.Helper()
		if got.Tenant != "1234567" || got.Status != http.StatusOK {
			t.Errorf("%s: reached Fortnox as tenant %q with status %d", what, got.Tenant, got.Status)
		}
		for _, name := range []string{"Access-Token", "Client-Secret", "Authorization-Code"} {
			if v := got.Header.Get(name); v != "" {
				t.Errorf("%s: header %s: %q reached Fortnox", what, name, v)
			}
			if v := got.Trailer.Get(name); v != "" {
				t.Errorf("%s: trailer %s: %q reached Fortnox", what, name, v)
			}
		}
		for _, v := range got.Header.Values("Connection") {
			if strings.Contains(strings.ToLower(v), "token") || strings.Contains(strings.ToLower(v), "secret") {
				t.Errorf("%s: Connection %q reached Fortnox", what, v)
			}
		}
	}

	status, body := sc.rawRequest("GET /3/companyinformation HTTP/1.1\nHost: 127.0.0.1\nX-Fortnox-Tenant: 1234567\n" + old + "X-Other: kept\n\n")
	if status != http.StatusOK {
		t.Fatalf("headers: %d %s", status, body)
	}
	got := lastRequest()
	check("headers", got)
	if got.Header.Get("X-Other") != "kept" {
		t.Error("another header of the app was lost: the test cannot see headers")
	}

	for _, conn := range []string{"Access-Token", "Client-Secret, X-Drop-Me, authorization-code"} {
		status, body := sc.rawRequest("GET /3/companyinformation HTTP/1.1\nHost: 127.0.0.1\nX-Fortnox-Tenant: 1234567\n" + old + "X-Drop-Me: 1\nConnection: " + conn + "\n\n")
		if status != http.StatusOK {
			t.Fatalf("Connection: %s: %d %s", conn, status, body)
		}
		got := lastRequest()
		check("Connection: "+conn, got)
		if strings.Contains(conn, "X-Drop-Me") && got.Header.Get("X-Drop-Me") != "" {
			t.Error("a header the app named in Connection was forwarded: hop-by-hop handling broke")
		}
	}

	for _, size := range []int{10, 4000} { // kept for a replay, and streamed
		payload := strings.Repeat("x", size)
		raw := fmt.Sprintf("POST /3/invoices HTTP/1.1\nHost: 127.0.0.1\nX-Fortnox-Tenant: 1234567\nTransfer-Encoding: chunked\nTrailer: Access-Token, Client-Secret, Authorization-Code, X-Other\n\n%x\n%s\n0\n%sX-Other: kept\n\n", size, payload, old)
		status, body := sc.rawRequest(raw)
		if status != http.StatusOK {
			t.Fatalf("%d-byte body: %d %s", size, status, body)
		}
		got := lastRequest()
		check(fmt.Sprintf("trailers of a %d-byte body", size), got)
		if len(got.Body) != size || got.Trailer.Get("X-Other") != "kept" {
			t.Errorf("%d-byte body: %d bytes and trailers %v reached Fortnox: the test cannot see trailers", size, len(got.Body), got.Trailer)
		}
	}
	if n := fake.Unauthorized(""); n != 0 {
		t.Errorf("%d requests reached Fortnox without the token", n)
	}
}
