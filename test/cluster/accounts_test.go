package cluster

import (
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"
)

// A named user's refresh-token chain beside the tenant's service account,
// driven through all three sidecars for several token lifetimes: every
// request carries its own account's token, zero invalid_grant, and about
// one refresh per cycle for the whole cluster (issue 12 in cluster mode).
func TestUserAccountChainAcrossTheCluster(t *testing.T) {
	t.Parallel()
	fake := startFake(t, chainLifetime)
	c := startCluster(t, fake, settings{maxWait: 10 * time.Second, refreshBefore: chainRefreshBefore})
	const tenant = "1500001"
	fake.GrantConsent(clientID, tenant)
	c.sidecars[2].putAccountRefreshToken(tenant, "anna", fake.IssueUserRefreshToken(clientID, tenant, "7"))

	const duration = 4 * chainLifetime
	start := time.Now()
	var mu sync.Mutex
	var failures []string
	requests := 0
	var wg sync.WaitGroup
	for i, sc := range c.sidecars {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; time.Since(start) < duration; n++ {
				account := ""
				if (n+i)%2 == 0 {
					account = "anna"
				}
				a := sc.getAs(tenant, account)
				mu.Lock()
				requests++
				if a.status != http.StatusOK {
					failures = append(failures, fmt.Sprintf("%s as %q: %s", sc.name, account, a))
				}
				mu.Unlock()
				// 3 sidecars, a request each every 900 ms and more:
				// under 3.4 a second, well inside the tenant's budget
				// (25 per 5.2 s). The budget's edge is
				// TestSharedRateBudget's to test, not this one's.
				time.Sleep(900 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed; first: %v", len(failures), requests, failures[:min(5, len(failures))])
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant: the user's refresh token was used twice", n)
	}
	if n := fake.LiveRefreshTokens(clientID, tenant, "7"); n != 1 {
		t.Errorf("%d live refresh tokens for the user, want its one chain", n)
	}
	// Each request reached Fortnox as its own account: the service
	// account without a user, anna as user 7.
	users := map[string]int{}
	for _, r := range fake.APIRequests() {
		if r.Tenant == tenant {
			users[r.User]++
		}
	}
	if users["7"] == 0 || users[""] == 0 || len(users) != 2 {
		t.Errorf("requests reached Fortnox as users %v, want the service account and user 7", users)
	}
	refreshes := fake.TokenRequests("refresh_token", tenant) - 1 // less the admin PUT's
	cycles := took.Seconds() / (chainLifetime / 2).Seconds()
	t.Logf("%d requests over %v; the user's chain: %d refreshes in %.1f cycles", requests, took.Round(time.Millisecond), refreshes, cycles)
	if float64(refreshes) > cycles+2 {
		t.Errorf("%d refreshes in %.1f cycles: the sidecars refreshed the user's chain for themselves", refreshes, cycles)
	}
	if n := fake.TokenRequests("client_credentials", tenant); float64(n) > cycles+2 {
		t.Errorf("%d client-credentials requests in %.1f cycles: the sidecars did not share the service account's token", n, cycles)
	}
}
