package cluster

import (
	"fmt"
	"net/http"
	"sort"
	"testing"
	"time"
)

// sidecarsKey is the registry of clientID's live sidecars.
const sidecarsKey = "caddy-fortnox:sidecars:fortnox/" + clientID + "/"

// Redis stopped (SIGKILL) while one tenant is driven through the three
// sidecars at three times its budget: each sidecar keeps to its share,
// floor(25 ÷ 3) = 8 per window, read from the registry of live sidecars,
// so Fortnox answers no 429 and no 25 arrivals fall within one window
// (each sidecar keeping the whole budget would send 75). Redis back: the
// shared budget holds again (no 429, at least 80% of it used).
//
// Not parallel, like TestSharedRateBudget: it measures the budget.
func TestOutageKeepsEachSidecarsShare(t *testing.T) {
	const maxWait = 15 * time.Second
	fake := startFake(t, 0)
	c := startCluster(t, fake, settings{maxWait: maxWait})
	const tenant, after = "1700001", "1700002"
	fake.GrantConsent(clientID, tenant)
	fake.GrantConsent(clientID, after)
	for _, sc := range c.sidecars {
		sc.mustServe(tenant) // the token cached in each, so the load measures the budget
	}
	rc := c.redisClient()
	var members []string
	testTook := time.Now()
	for time.Since(testTook) < 10*time.Second {
		ctx, cancel := redisContext()
		members, _ = rc.ZRange(ctx, sidecarsKey, 0, -1).Result()
		cancel()
		if len(members) == 3 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(members) != 3 {
		t.Fatalf("the registry %s holds %v, want the three sidecars", sidecarsKey, members)
	}
	// Each sidecar reads the count with its own next beat (5 s apart).
	time.Sleep(6 * time.Second)

	c.redis.Kill()
	rate := 3 * float64(budget) / budgetWindow.Seconds()
	res := drive(c.sidecars, tenant, rate, 10*time.Second, 20)
	tooMany, _ := admitted(c, tenant, http.StatusTooManyRequests, res.start, 0)
	var at []time.Time
	for _, r := range fake.APIRequests() {
		if r.Tenant == tenant && r.Status == http.StatusOK && !r.At.Before(res.start) {
			at = append(at, r.At)
		}
	}
	sort.Slice(at, func(i, j int) bool { return at[i].Before(at[j]) })
	share := 3 * (budget / 3)
	var tightest time.Duration
	for i := share; i < len(at); i++ {
		if span := at[i].Sub(at[i-share]); tightest == 0 || span < tightest {
			tightest = span
		}
	}
	t.Logf("Redis down, %.0f req/s for 10 s through 3 sidecars: %d sent, statuses %v; Fortnox answered %d with 200 and %d with 429; the tightest %d arrivals spanned %v",
		rate, res.sent, res.statuses, len(at), tooMany, share+1, tightest.Round(time.Millisecond))
	if tooMany != 0 {
		t.Errorf("Fortnox answered %d requests with 429 while Redis was down: %s", tooMany, arrivalsBefore429(c, tenant, res.start))
	}
	if tightest != 0 && tightest < budgetWindow {
		t.Errorf("%d arrivals within %v while Redis was down: more than 3 sidecars × 8", share+1, tightest)
	}
	if len(at) < share {
		t.Errorf("only %d requests reached Fortnox in 10 s while Redis was down", len(at))
	}
	if t.Failed() {
		var ts []string
		for _, a := range at {
			ts = append(ts, fmt.Sprintf("%.3f", a.Sub(res.start).Seconds()))
		}
		t.Logf("arrivals at Fortnox while Redis was down (s after the load started): %v", ts)
	}

	if err := c.redis.Restart(); err != nil {
		t.Fatal(err)
	}
	for _, sc := range c.sidecars {
		sc.waitLog("Redis can be reached again", 1, 10*time.Second)
	}
	c.sidecars[0].mustServe(after)
	checkSharedBudget(t, c, after, 10*time.Second, maxWait)
}
