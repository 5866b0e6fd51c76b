package cluster

import (
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// A tenant's first requests through all three sidecars at once make
// exactly one token request for the whole cluster: one sidecar asks
// Fortnox under the tenant's Redis lock, the others read its token.
func TestFirstRequestsMakeOneTokenRequest(t *testing.T) {
	t.Parallel()
	fake := startFake(t, 0)
	c := startCluster(t, fake, settings{maxWait: 10 * time.Second})
	tenants := []string{"1200001", "1200002", "1200003", "1200004"}
	for _, tn := range tenants {
		fake.GrantConsent(clientID, tn)
	}
	const perSidecar = 4 // 12 requests per tenant: within its budget, so none waits
	start := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	for _, tn := range tenants {
		for _, sc := range c.sidecars {
			for range perSidecar {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					if a := sc.get(tn); a.status != http.StatusOK {
						mu.Lock()
						failures = append(failures, sc.name+" "+tn+": "+a.String())
						mu.Unlock()
					}
				}()
			}
		}
	}
	close(start)
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d requests failed: %v", len(failures), failures)
	}
	for _, tn := range tenants {
		if n := fake.TokenRequests("client_credentials", tn); n != 1 {
			t.Errorf("tenant %s: %d token requests for its first %d requests through 3 sidecars, want 1", tn, n, 3*perSidecar)
		}
	}
	// A sidecar started later reads the token too.
	c.sidecars[2].kill()
	c.sidecars[2].start()
	c.sidecars[2].mustServe(tenants[0])
	if n := fake.TokenRequests("client_credentials", tenants[0]); n != 1 {
		t.Errorf("a restarted sidecar asked Fortnox again: %d token requests", n)
	}
}

// errorCode reads the "error" of the sidecar's JSON answer.
func errorCode(a answer) string {
	var e struct {
		Error string `json:"error"`
	}
	_ = json.Unmarshal([]byte(a.body), &e)
	return e.Error
}

// untilAll polls every sidecar (each in turn, every 100 ms) until each has
// answered as want says, and returns how long each took after since.
func untilAll(t *testing.T, c *cluster, tenant string, since time.Time, within time.Duration, want func(answer) bool) []time.Duration {
	t.Helper()
	took := make([]time.Duration, len(c.sidecars))
	var wg sync.WaitGroup
	var mu sync.Mutex
	var last []string
	for i, sc := range c.sidecars {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				a := sc.get(tenant)
				if want(a) {
					took[i] = time.Since(since)
					return
				}
				if time.Since(since) > within {
					mu.Lock()
					last = append(last, sc.name+": "+a.String())
					mu.Unlock()
					took[i] = -1
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	if len(last) > 0 {
		t.Fatalf("not every sidecar changed within %v; last answers: %v", within, last)
	}
	return took
}

// A revocation posted to one sidecar's webhook is refused by all three
// within 2 s (each had the tenant's token cached), a sidecar started
// afterwards reads it, and a new consent posted to another sidecar lifts it
// everywhere, also in the sidecar that has just started (it subscribes to
// the broadcasts shortly after it starts, so it reads what it missed). The
// fake Fortnox keeps the consent throughout, so only the event can make a
// sidecar refuse.
func TestRevocationReachesEverySidecar(t *testing.T) {
	t.Parallel()
	fake := startFake(t, 0)
	c := startCluster(t, fake, settings{maxWait: 10 * time.Second})
	const tenant = "1300001"
	fake.GrantConsent(clientID, tenant)
	for _, sc := range c.sidecars {
		sc.mustServe(tenant)
	}

	c.sidecars[0].postConsentEvent("client_credentials_consent_revoked", tenant)
	posted := time.Now()
	took := untilAll(t, c, tenant, posted, 2*time.Second, func(a answer) bool {
		return a.status == http.StatusForbidden && errorCode(a) == "consent_revoked"
	})
	t.Logf("revocation posted to a: refused by a, b, c after %v", took)

	// A sidecar that starts after the event reads the tenant's shared state.
	c.sidecars[2].kill()
	c.sidecars[2].start()
	if a := c.sidecars[2].get(tenant); a.status != http.StatusForbidden || errorCode(a) != "consent_revoked" {
		t.Errorf("c, started after the revocation: %v", a)
	}

	c.sidecars[1].postConsentEvent("client_credentials_consent", tenant)
	posted = time.Now()
	took = untilAll(t, c, tenant, posted, 2*time.Second, func(a answer) bool { return a.status == http.StatusOK })
	t.Logf("new consent posted to b: served by a, b, c after %v", took)

	// A revocation and a new consent in quick succession, through two
	// sidecars: the second may take the new consent before it reads the
	// first one's broadcast of the revocation. Every sidecar must end up
	// serving the tenant, and stay so.
	for round := range 6 {
		c.sidecars[round%3].postConsentEvent("client_credentials_consent_revoked", tenant)
		c.sidecars[(round+1)%3].postConsentEvent("client_credentials_consent", tenant)
		untilAll(t, c, tenant, time.Now(), 2*time.Second, func(a answer) bool { return a.status == http.StatusOK })
		time.Sleep(300 * time.Millisecond)
		for _, sc := range c.sidecars {
			if a := sc.get(tenant); a.status != http.StatusOK {
				t.Fatalf("round %d: revoked through %s, consent through %s; %s then: %v",
					round, c.sidecars[round%3].name, c.sidecars[(round+1)%3].name, sc.name, a)
			}
		}
	}
	if n := fake.TokenErrors(""); n != 0 {
		t.Errorf("%d token errors", n)
	}
}

// chainLifetime is the access-token lifetime of the refresh-token tests:
// short, so that a test walks through several refresh cycles. With
// refresh_before 4s a token is refreshed about 4 s after issue (up to a
// tenth of its lifetime earlier) and sent until 2 s before it expires.
const (
	chainLifetime      = 8 * time.Second
	chainRefreshBefore = 4 * time.Second
)

// lastRefresh is when the fake last answered a refresh of tenant with 200
// (zero: never).
func lastRefresh(fake *fakefortnox.Server, tenant string) time.Time {
	var at time.Time
	for _, r := range fake.TokenRequestLog() {
		if r.Grant == "refresh_token" && r.Tenant == tenant && r.Status == http.StatusOK && r.At.After(at) {
			at = r.At
		}
	}
	return at
}

// firstRefreshAfter is when the fake first answered a refresh of tenant
// with 200 after since (zero: never).
func firstRefreshAfter(fake *fakefortnox.Server, tenant string, since time.Time) time.Time {
	var at time.Time
	for _, r := range fake.TokenRequestLog() {
		if r.Grant == "refresh_token" && r.Tenant == tenant && r.Status == http.StatusOK && r.At.After(since) && (at.IsZero() || r.At.Before(at)) {
			at = r.At
		}
	}
	return at
}

// A refresh token put through one sidecar serves all three. Over five
// token lifetimes under steady traffic through all three, with a sidecar
// killed (SIGKILL) at random moments and started again: no invalid_grant,
// no failed request, and about one refresh per cycle for the whole cluster.
func TestRefreshTokenChainAcrossKills(t *testing.T) {
	t.Parallel()
	fake := startFake(t, chainLifetime)
	c := startCluster(t, fake, settings{maxWait: 10 * time.Second, refreshBefore: chainRefreshBefore})
	const tenant = "1400001"
	c.sidecars[0].putRefreshToken(tenant, fake.IssueRefreshToken(clientID, tenant))
	for _, sc := range c.sidecars {
		sc.mustServe(tenant)
	}

	const duration = 5 * chainLifetime
	seed := time.Now().UnixNano()
	t.Logf("kill schedule seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 0))
	start := time.Now()
	var requests, lost atomic.Int64
	var mu sync.Mutex
	var failures []string
	var slowest time.Duration
	var wg sync.WaitGroup
	// One app worker per sidecar, a request every 800 ms each: 3.75 per
	// second in all, well inside the tenant's budget (25 per 5.2 s), so
	// that no request waits for a turn and its edge (TestSharedRateBudget's
	// to test) plays no part here.
	for _, sc := range c.sidecars {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < duration {
				if !sc.up.Load() {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				a := sc.get(tenant)
				requests.Add(1)
				mu.Lock()
				switch {
				case a.err != nil && (!sc.up.Load() || sc.generation.Load() != a.generation):
					lost.Add(1) // in flight when the sidecar was killed
				case a.status != http.StatusOK:
					failures = append(failures, sc.name+": "+a.String())
				default:
					slowest = max(slowest, a.took)
				}
				mu.Unlock()
				time.Sleep(800 * time.Millisecond)
			}
		}()
	}
	var kills []string
	for {
		wait := time.Second + time.Duration(rng.Int64N(int64(4*time.Second)))
		if time.Since(start)+wait+2*time.Second > duration {
			break
		}
		time.Sleep(wait)
		victim := c.sidecars[rng.IntN(len(c.sidecars))]
		victim.kill()
		kills = append(kills, victim.name+"@"+time.Since(start).Round(100*time.Millisecond).String())
		time.Sleep(time.Duration(rng.Int64N(int64(1500 * time.Millisecond))))
		victim.start()
	}
	wg.Wait()
	took := time.Since(start)

	refreshes := fake.TokenRequests("refresh_token", tenant) - 1 // less the admin PUT's
	cycles := took.Seconds() / (chainLifetime / 2).Seconds()
	t.Logf("%d requests over %v, %d lost in flight to kills; kills: %v; slowest answer %v; %d refreshes in %.1f cycles of %v",
		requests.Load(), took.Round(time.Millisecond), lost.Load(), kills, slowest.Round(time.Millisecond), refreshes, cycles, chainLifetime/2)
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed; first: %v", len(failures), requests.Load(), failures[:min(5, len(failures))])
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant answers: a refresh token was used twice", n)
	}
	if n := fake.LiveRefreshTokens(clientID, tenant, ""); n != 1 {
		t.Errorf("%d live refresh tokens at the end, want 1 (the chain)", n)
	}
	if len(kills) < 3 {
		t.Errorf("only %d kills", len(kills))
	}
	// A token is refreshed between 0.4 and 0.5 of its lifetime after
	// issue: one refresh per cycle for the cluster. Three sidecars each
	// refreshing for themselves would make three times as many.
	if float64(refreshes) > cycles*1.25+2 {
		t.Errorf("%d refreshes in %.1f cycles: the sidecars refreshed for themselves", refreshes, cycles)
	}
	if float64(refreshes) < cycles*0.8-1 {
		t.Errorf("only %d refreshes in %.1f cycles", refreshes, cycles)
	}
}

// A sidecar killed while it holds a tenant's Redis lock, its refresh
// request still unanswered at Fortnox: the others keep serving from their
// cached tokens, then answer 503 refresh_in_progress while its in-flight
// mark lives (Fortnox may have rotated the token), and once the mark is
// given up (rotation_timeout) and the dead lock has expired (at most its
// 10 s TTL) continue the chain. No 403; no invalid_grant.
func TestSidecarKilledHoldingTheLock(t *testing.T) {
	t.Parallel()
	fake := startFake(t, chainLifetime)
	// rotation_timeout short: the dead holder's in-flight mark is given up
	// within the lock's lifetime.
	c := startCluster(t, fake, settings{maxWait: 10 * time.Second, refreshBefore: chainRefreshBefore, rotationTimeout: 5 * time.Second})
	const tenant = "1500001"
	a, others := c.sidecars[0], c.sidecars[1:]
	a.putRefreshToken(tenant, fake.IssueRefreshToken(clientID, tenant))
	for _, sc := range c.sidecars {
		sc.mustServe(tenant)
	}
	// When the token is due, a request through a makes a refresh in the
	// background, under the lock; Fortnox holds the refresh unanswered.
	time.Sleep(time.Until(lastRefresh(fake, tenant).Add(chainLifetime / 2)))
	fake.SetTenantFault(tenant, fakefortnox.Fault{Delay: time.Minute})
	a.mustServe(tenant)
	lockKey := "caddy-fortnox:lock:{fortnox/" + clientID + "/" + tenant + "}:fortnox/" + clientID + "/" + tenant
	rc := c.redisClient()
	testproc.WaitFor(t, "a takes the lock", 5*time.Second, func() bool {
		ctx, cancel := redisContext()
		defer cancel()
		return rc.Exists(ctx, lockKey).Val() == 1
	})
	a.kill()
	killed := time.Now()
	fake.ClearTenantFault(tenant)

	// b and c under steady traffic for the lock's lifetime and a bit.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	var slowest time.Duration
	served, inProgress := 0, 0
	for _, sc := range others {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(killed) < 14*time.Second {
				ans := sc.get(tenant)
				mu.Lock()
				switch {
				case ans.status == http.StatusServiceUnavailable && ans.retryAfter != "" && strings.Contains(ans.body, `"refresh_in_progress"`):
					// a's rotation may have reached Fortnox: nobody
					// spends the token until its mark is given up.
					inProgress++
				case ans.status != http.StatusOK:
					failures = append(failures, sc.name+": "+ans.String())
				default:
					served++
					slowest = max(slowest, ans.took)
				}
				mu.Unlock()
				time.Sleep(500 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	next := firstRefreshAfter(fake, tenant, killed)
	t.Logf("a killed holding the lock: the next refresh came %v later; b and c served %d requests, the slowest in %v; %d answered refresh_in_progress",
		next.Sub(killed).Round(time.Millisecond), served, slowest.Round(time.Millisecond), inProgress)
	if len(failures) > 0 {
		t.Errorf("%d requests failed; first: %v", len(failures), failures[:min(5, len(failures))])
	}
	if !next.After(killed) {
		t.Fatal("nobody refreshed after a died")
	}
	if d := next.Sub(killed); d > 11*time.Second {
		t.Errorf("the dead sidecar's lock held the others up %v (its TTL is 10 s)", d)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant: the chain broke", n)
	}
	a.start()
	a.mustServe(tenant)
	if n := fake.LiveRefreshTokens(clientID, tenant, ""); n != 1 {
		t.Errorf("%d live refresh tokens, want 1", n)
	}
}

// A 401 that one sidecar meets drops the tenant's token for the whole
// cluster: after Fortnox revokes the token, one request reaches Fortnox
// with it and is replayed with a new token, and the other sidecars,
// told within a second, go straight to the new one: no 401 of their own,
// no token request of their own.
func TestUnauthorizedDropsTheTokenForEverySidecar(t *testing.T) {
	t.Parallel()
	fake := startFake(t, 0)
	c := startCluster(t, fake, settings{maxWait: 10 * time.Second})
	const tenant = "1800001"
	fake.GrantConsent(clientID, tenant)
	for _, sc := range c.sidecars {
		sc.mustServe(tenant)
	}
	if n := fake.TokenRequests("client_credentials", tenant); n != 1 {
		t.Fatalf("%d token requests before the revocation, want the cluster's one", n)
	}
	// Past the 10 s in which a 401 is not held against a token just
	// minted (the sidecars' clocks cannot be moved: they are processes).
	time.Sleep(11 * time.Second)

	fake.RevokeAccessTokens(clientID, tenant)
	c.sidecars[0].mustServe(tenant) // 401, then replayed with a new token
	time.Sleep(time.Second)         // every sidecar acts within a second
	for _, sc := range c.sidecars[1:] {
		sc.mustServe(tenant)
	}
	if n := fake.Unauthorized(tenant); n != 1 {
		t.Errorf("Fortnox answered %d requests with 401, want 1: the other sidecars kept the revoked token", n)
	}
	if n := fake.TokenRequests("client_credentials", tenant); n != 2 {
		t.Errorf("%d token requests, want 2: one before and one after the revocation, for the whole cluster", n)
	}
}
