package cluster

import (
	"net/http"
	"sync"
	"testing"
	"time"
)

// timedAnswer is an answer and when it came.
type timedAnswer struct {
	answer
	sidecar string
	at      time.Time
}

// poll sends GET for each tenant through every sidecar every interval
// until the deadline, and returns every answer per tenant.
func poll(c *cluster, tenants []string, interval time.Duration, until time.Time) map[string][]timedAnswer {
	var mu sync.Mutex
	out := map[string][]timedAnswer{}
	var wg sync.WaitGroup
	for _, sc := range c.sidecars {
		for _, tn := range tenants {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(until) {
					a := sc.get(tn)
					mu.Lock()
					out[tn] = append(out[tn], timedAnswer{answer: a, sidecar: sc.name, at: time.Now()})
					mu.Unlock()
					time.Sleep(interval)
				}
			}()
		}
	}
	wg.Wait()
	return out
}

// Redis killed (SIGKILL): tenants on client credentials, cached or new,
// are still served (their tokens are fetched directly); a refresh-token
// tenant is served until its token expires, then gets 503 with
// Retry-After, since its refresh token is never used without the
// cluster's lock. Each sidecar logs the outage once and counts it. Redis
// restarted on its append-only file: the refresh-token chain continues
// (no invalid_grant), and the rate budget is shared again (three times the
// load gives no 429).
func TestRedisOutage(t *testing.T) {
	t.Parallel()
	const maxWait = 15 * time.Second
	fake := startFake(t, chainLifetime)
	c := startCluster(t, fake, settings{maxWait: maxWait, refreshBefore: chainRefreshBefore})
	const (
		cached  = "1600001" // client credentials, cached before the outage
		chain   = "1600002" // refresh token
		fresh   = "1600003" // client credentials, first used during the outage
		afterTn = "1600004" // the budget after the outage
	)
	for _, tn := range []string{cached, fresh, afterTn} {
		fake.GrantConsent(clientID, tn)
	}
	for _, sc := range c.sidecars {
		sc.mustServe(cached)
	}
	c.sidecars[0].putRefreshToken(chain, fake.IssueRefreshToken(clientID, chain))
	for _, sc := range c.sidecars {
		sc.mustServe(chain)
	}
	issued := lastRefresh(fake, chain)

	c.redis.Kill()
	killed := time.Now()
	// Past the chain's token expiry; every tenant's token expires meanwhile
	// (an 8 s lifetime). A request every 700 ms per sidecar and tenant:
	// 4.3 per second per tenant, inside its budget even with each sidecar
	// counting turns by itself.
	expires := issued.Add(chainLifetime)
	answers := poll(c, []string{cached, chain, fresh}, 700*time.Millisecond, expires.Add(1500*time.Millisecond))

	for _, tn := range []string{cached, fresh} {
		for _, a := range answers[tn] {
			if a.status != http.StatusOK {
				t.Errorf("client-credentials tenant %s during the outage, %s at +%v: %v", tn, a.sidecar, a.at.Sub(killed).Round(time.Millisecond), a.answer)
			}
		}
	}
	// Sent until 2 s before expiry (skew: a quarter of 8 s), so served
	// until then; refused once expired.
	servedUntil := expires.Add(-chainLifetime / 4)
	var served, refused int
	for _, a := range answers[chain] {
		switch {
		case a.at.Before(servedUntil.Add(-300 * time.Millisecond)):
			if a.status != http.StatusOK {
				t.Errorf("refresh-token tenant before its token expired, %s at +%v: %v", a.sidecar, a.at.Sub(killed).Round(time.Millisecond), a.answer)
			}
			served++
		case a.at.After(expires.Add(200 * time.Millisecond)):
			if a.status != http.StatusServiceUnavailable || a.retryAfter == "" {
				t.Errorf("refresh-token tenant after its token expired, %s at +%v: want 503 with Retry-After, got %v (Retry-After %q)",
					a.sidecar, a.at.Sub(killed).Round(time.Millisecond), a.answer, a.retryAfter)
			}
			refused++
		}
	}
	t.Logf("outage: refresh-token tenant served %d times until its token expired (%v after the kill), then refused %d times with 503; client-credentials tenants %d and %d answers, all checked",
		served, expires.Sub(killed).Round(time.Millisecond), refused, len(answers[cached]), len(answers[fresh]))
	if served == 0 || refused == 0 {
		t.Errorf("the poll missed a phase: %d served before expiry, %d refused after", served, refused)
	}
	// Each sidecar fetches the new tenant's token for itself, once per
	// refresh cycle (0.4 to 0.5 of the lifetime), not once per request.
	perSidecar := 1 + int(time.Since(killed)/(chainLifetime*4/10))
	if n := fake.TokenRequests("client_credentials", fresh); n > perSidecar*len(c.sidecars) {
		t.Errorf("%d token requests for the new tenant during the outage: more than %d per sidecar", n, perSidecar)
	}
	for _, sc := range c.sidecars {
		if lines := sc.logLines("Redis cannot be reached"); len(lines) != 1 {
			t.Errorf("%s logged the outage %d times, want once", sc.name, len(lines))
		}
		if n := sc.metric("caddy_fortnox_redis_errors_total"); n == 0 {
			t.Errorf("%s: caddy_fortnox_redis_errors_total is 0 after an outage", sc.name)
		}
	}

	if err := c.redis.Restart(); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	for _, sc := range c.sidecars {
		sc.waitLog("Redis can be reached again", 1, 10*time.Second)
	}
	took := untilAll(t, c, chain, restarted, 10*time.Second, func(a answer) bool { return a.status == http.StatusOK })
	t.Logf("Redis back: the refresh-token tenant served again by a, b, c after %v", took)
	for _, sc := range c.sidecars {
		down, up := sc.logLines("Redis cannot be reached"), sc.logLines("Redis can be reached again")
		if len(down) != 1 || len(up) != 1 {
			t.Errorf("%s logged one outage as %d lines 'cannot be reached' and %d 'can be reached again', want one each", sc.name, len(down), len(up))
		}
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant: the chain broke", n)
	}
	if at := firstRefreshAfter(fake, chain, restarted); at.IsZero() {
		t.Error("no refresh after Redis came back")
	}
	if n := fake.LiveRefreshTokens(clientID, chain, ""); n != 1 {
		t.Errorf("%d live refresh tokens, want 1", n)
	}

	c.sidecars[0].mustServe(afterTn)
	checkSharedBudget(t, c, afterTn, 10*time.Second, maxWait)
}
