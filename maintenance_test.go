package fortnox

import (
	"crypto/cipher"
	"fmt"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// Token requests stay bounded: 200 made-up TenantIds at once are paced
// (at most max_token_requests in flight per client id), their failures are
// remembered cheaply, and tenants warmed together do not refresh together.

func TestTokenRequestsArePacedPerClient(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetFault(fakefortnox.Fault{Delay: 50 * time.Millisecond})
	sc := startSidecar(t, fake, "rate_limit off\nmax_token_requests 8")
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, body, _ := sc.get("/3/companyinformation", fmt.Sprint(5000000+i))
			if status != http.StatusForbidden {
				t.Errorf("made-up tenant: %d %s", status, body)
			}
		}()
	}
	wg.Wait()
	if n := fake.MaxConcurrentTokenRequests(); n > 8 || n < 2 {
		t.Errorf("%d token requests in flight at once, want at most 8 (and more than 1: the test proves nothing otherwise)", n)
	}
	if n := fake.TokenRequests("", ""); n != 200 {
		t.Errorf("%d token requests, want one per tenant", n)
	}
}

// Subjects that never had a token are remembered in bounded number, and
// forgotten sooner than tenants that once worked.
func TestUnknownFailuresAreBounded(t *testing.T) {
	m := tokens.NewManager("http://127.0.0.1:1/token", "bounded-client", clk)
	defer m.Destruct()
	m.Settings.Store(&tokens.Settings{Logger: testLogger(t)})
	for i := range tokens.MaxUnknownSubjects + 2000 {
		m.RecordFailure(tokens.Subject{Tenant: fmt.Sprint(5000000 + i)}, tokens.GrantClientCredentials, &tokens.Error{Failure: tokens.FailNoConsent}, time.Millisecond)
	}
	n := m.Ledger().Len()
	oldest := m.Ledger().Knows("5000000")
	newest := m.Ledger().Knows(fmt.Sprint(5000000 + tokens.MaxUnknownSubjects + 1999))
	if n > tokens.MaxUnknownSubjects || oldest || !newest {
		t.Fatalf("%d subjects remembered (oldest kept: %v, newest kept: %v), want at most %d, the oldest gone", n, oldest, newest, tokens.MaxUnknownSubjects)
	}
	// A tenant that once had a token keeps its error for an hour; an
	// unknown one for minutes.
	m.RecordSuccess(tokens.Subject{Tenant: "1234567"}, tokens.GrantClientCredentials, &tokens.Token{}, time.Millisecond)
	m.RecordFailure(tokens.Subject{Tenant: "1234567"}, tokens.GrantClientCredentials, &tokens.Error{Failure: tokens.FailUnavailable}, time.Millisecond)
	clk.Advance(tokens.BackoffCap + tokens.ForgetUnknownAfter)
	m.ForgetIdleTenants()
	known := m.Ledger().Knows("1234567")
	left := m.Ledger().Len()
	if !known || left != 1 {
		t.Errorf("after %v: known tenant kept=%v, %d subjects left, want only it", tokens.BackoffCap+tokens.ForgetUnknownAfter, known, left)
	}
}

// refreshAtOf returns when the cached token of tenant is due for refresh.
func refreshAtOf(m *tokens.Manager, tenant string) time.Time {
	v, _ := m.Cache.Get(tenant)
	return time.Unix(0, v.(*tokens.Token).RefreshAt.Load())
}

// 1,000 tenants warmed in the same instant are due for refresh spread over
// a tenth of the lifetime before max(lifetime-refresh_before, lifetime/2),
// not in the same second.
func TestRefreshAheadIsSpread(t *testing.T) {
	m := tokens.NewManager("http://127.0.0.1:1/token", "spread-client", clk)
	defer m.Destruct()
	const lifetime, before = time.Hour, 5 * time.Minute
	issued := clk.Now()
	for i := range 1000 {
		m.CacheToken(tokens.Subject{Tenant: fmt.Sprint(1000000 + i)}, tokens.GrantClientCredentials, "t", issued, lifetime, before)
	}
	latest := issued.Add(tokens.RefreshAheadAfter(lifetime, before))
	earliest := latest.Add(-lifetime / 10)
	perMinute := map[int]int{}
	seconds := map[int64]bool{}
	for i := range 1000 {
		at := refreshAtOf(m, fmt.Sprint(1000000+i))
		if at.Before(earliest) || at.After(latest) {
			t.Fatalf("refresh at %v after issue, want between %v and %v", at.Sub(issued), earliest.Sub(issued), latest.Sub(issued))
		}
		perMinute[int(at.Sub(earliest)/time.Minute)]++
		seconds[at.Unix()] = true
	}
	// Walk the movable clock through the window: each of its six minutes
	// takes its share (about 167), none takes them all.
	for minute := range 6 {
		if n := perMinute[minute]; n < 100 || n > 250 {
			t.Errorf("minute %d of the window: %d refreshes, want about 167 (%v)", minute, n, perMinute)
		}
	}
	if len(seconds) < 250 {
		t.Errorf("the refreshes fall in %d distinct seconds, want them spread", len(seconds))
	}
}

// End to end: three dozen tenants warmed together refresh over several
// minutes, each once, with no request waiting for a token.
func TestTenantsWarmedTogetherRefreshApart(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	var tenants []string
	for i := range 36 {
		tenants = append(tenants, fmt.Sprint(3000000+i))
		fake.GrantConsent(testClientID, tenants[i])
	}
	sc := startSidecar(t, fake, "rate_limit off")
	for _, tn := range tenants {
		sc.get("/3/companyinformation", tn)
	}
	m := sc.manager()
	advance(fake, 48*time.Minute)
	fake.Reset()
	steps := map[int]int{}
	for step := range 16 { // 48 to 56 minutes, 30 s apart
		advance(fake, 30*time.Second)
		before := fake.TokenRequests("", "")
		for _, tn := range tenants {
			if status, body, _ := sc.get("/3/companyinformation", tn); status != http.StatusOK {
				t.Fatalf("%s: %d %s", tn, status, body)
			}
		}
		eventually(t, 5*time.Second, "background refreshes", func() bool {
			for _, tn := range tenants {
				if v, ok := m.Cache.Get(tn); ok && v.(*tokens.Token).Refreshing.Load() {
					return false
				}
			}
			return true
		})
		if n := fake.TokenRequests("", "") - before; n > 0 {
			steps[step] = n
		}
	}
	if n := fake.TokenRequests("", ""); n != len(tenants) {
		t.Errorf("%d refreshes, want one per tenant", n)
	}
	if len(steps) < 5 {
		t.Errorf("the refreshes fell in %d of 16 half-minute steps (%v), want them spread", len(steps), steps)
	}
	if misses := m.Misses.Load(); misses != int64(len(tenants)) {
		t.Errorf("%d requests waited for a token, want only the first per tenant", misses)
	}
}

// A refresh token unused for 30 days is refreshed in the background,
// under the lock; GET /fortnox/tenants and a metric show its age. A tenant
// on client credentials keeps its service account's token.
func TestRefreshTokensAreKeptAlive(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567") // on client credentials, the refresh token only a fallback
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	m := sc.manager()
	advance(fake, 20*24*time.Hour)
	if n := m.KeepAlive(); n != 0 {
		t.Fatalf("%d refreshed at 20 days", n)
	}
	if age := findTenant(sc.tenants(), "7654321").RefreshTokenAge; age == nil || *age < 20*24*3600 {
		t.Errorf("refresh_token_age_seconds = %v at 20 days", age)
	}
	if got := scrape(t, sc)["caddy_fortnox_refresh_token_oldest_age_seconds"]; got < 20*24*3600 {
		t.Errorf("oldest age metric %v at 20 days", got)
	}
	advance(fake, 11*24*time.Hour) // 31 days
	before := fake.TokenRequests("refresh_token", "")
	if n := m.KeepAlive(); n != 2 {
		t.Fatalf("%d refreshed at 31 days, want both", n)
	}
	if n := fake.TokenRequests("refresh_token", "") - before; n != 2 {
		t.Errorf("%d refreshes, want 2", n)
	}
	for _, tn := range []string{"1234567", "7654321"} {
		rec := sc.storedRecord(tn)
		if !fake.RefreshTokenValid(rec.RefreshToken) || clk.Now().Sub(rec.RefreshTokenAt) > time.Minute {
			t.Errorf("%s: the stored refresh token was not renewed", tn)
		}
	}
	if n := m.KeepAlive(); n != 0 {
		t.Errorf("a second pass refreshed %d again", n)
	}
	advance(fake, 15*24*time.Hour) // 46 days after the first hand-over: the old chain would be dead
	for _, tn := range []string{"1234567", "7654321"} {
		if status, body, _ := sc.get("/3/companyinformation", tn); status != http.StatusOK {
			t.Errorf("%s after 46 days: %d %s", tn, status, body)
		}
	}
	if got := scrape(t, sc)["caddy_fortnox_refresh_tokens_kept_alive_total"]; got < 2 {
		t.Errorf("kept-alive metric %v", got)
	}
}

// A store moves from one encryption key to another with no refresh token
// lost: the new key is listed first and the old one after it; records are
// rewritten with the new key when next written; then the old key goes.
func TestEncryptionKeyRotation(t *testing.T) {
	const oldKey, newKey = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=", "3q2+796tvu/erb7v3q2+796tvu/erb7v3q2+796tvu8="
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	tenants := []string{"1234567", "7654321", "5550001"}
	t.Setenv("FORTNOX_TEST_KEY", oldKey)
	t.Setenv("FORTNOX_TEST_OLD_KEY", "")
	sc := startSidecar(t, fake, "encryption_key {env.FORTNOX_TEST_KEY}")
	for _, tn := range tenants {
		sc.putRefreshToken(tn, fake.IssueRefreshToken(testClientID, tn))
	}
	readable := func(key string) map[string]bool {
		aead, err := tokens.ParseEncryptionKey(key)
		if err != nil {
			t.Fatal(err)
		}
		rs := &tokens.Records{ClientID: testClientID, Keys: []cipher.AEAD{aead}}
		out := map[string]bool{}
		for _, tn := range tenants {
			raw, _ := os.ReadFile(sc.recordPath(tn))
			_, err := rs.Decode(tokens.RecordKey(testClientID, tokens.Subject{Tenant: tn}), raw)
			out[tn] = err == nil
		}
		return out
	}
	caddyStop(t)
	sc.options = "encryption_key {env.FORTNOX_TEST_KEY} {env.FORTNOX_TEST_OLD_KEY}"
	t.Setenv("FORTNOX_TEST_KEY", newKey)
	t.Setenv("FORTNOX_TEST_OLD_KEY", oldKey)
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	advance(fake, time.Hour) // every request refreshes: every record is written again
	for _, tn := range tenants {
		if status, body, _ := sc.get("/3/companyinformation", tn); status != http.StatusOK {
			t.Fatalf("%s during the move: %d %s", tn, status, body)
		}
	}
	if got := fmt.Sprint(readable(newKey)); got != "map[1234567:true 5550001:true 7654321:true]" {
		t.Fatalf("records readable with the new key: %s", got)
	}
	caddyStop(t)
	sc.options = "encryption_key {env.FORTNOX_TEST_KEY}"
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	advance(fake, time.Hour)
	for _, tn := range tenants {
		if status, body, _ := sc.get("/3/companyinformation", tn); status != http.StatusOK {
			t.Errorf("%s with the new key alone: %d %s", tn, status, body)
		}
		if n := fake.LiveRefreshTokens(testClientID, tn, ""); n != 1 {
			t.Errorf("%s: %d live refresh tokens", tn, n)
		}
	}
	if got := readable(oldKey); got["1234567"] || got["7654321"] || got["5550001"] {
		t.Errorf("records still readable with the old key: %v", got)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
	keys := make([]string, 0)
	for _, l := range sc.logLines("token request failed") {
		keys = append(keys, fmt.Sprint(l["error"]))
	}
	sort.Strings(keys)
	if len(keys) > 0 && strings.Contains(strings.Join(keys, " "), "decrypt") {
		t.Errorf("decryption failures during the move: %v", keys)
	}
}
