package cluster

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// startOnRedisCluster starts a Redis Cluster of three primaries (each with
// its append-only file, fsync always) and three sidecars on it, each with
// `redis { cluster {env.FORTNOX_REDIS_CLUSTER} }`, the placeholder standing
// for the three nodes.
func startOnRedisCluster(t *testing.T, fake *fakefortnox.Server, s settings) *cluster {
	t.Helper()
	buildCaddy(t)
	if !testproc.CheckBinaries("test/cluster: sidecars on a Redis Cluster", "redis-server", "redis-cli") {
		t.Fatal("redis-server and redis-cli are needed (apt-get install redis-server; CI has them)")
	}
	nodes := testproc.StartCluster(t, redisAOF)
	s.redisCluster = strings.Join(nodes.Addrs(), ",")
	c := &cluster{t: t, fake: fake, nodes: nodes}
	for _, name := range []string{"a", "b", "c"} {
		c.sidecars = append(c.sidecars, newSidecar(t, name, fake, s))
	}
	c.waitSubscribed()
	return c
}

// deleteToken drops tenant's token through the sidecar's admin API: every
// sidecar forgets it, and the next request needs a new one.
func (sc *sidecar) deleteToken(tenant string) {
	sc.t.Helper()
	req, _ := http.NewRequest(http.MethodDelete, sc.adminURL+"/fortnox/tenants/"+tenant+"/token", nil)
	resp, err := client.Do(req)
	if err != nil {
		sc.t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		sc.t.Fatalf("%s: DELETE token of %s: %d", sc.name, tenant, resp.StatusCode)
	}
}

// Three sidecars on a Redis Cluster of three primaries keep every promise
// they keep on one server:
//   - three tenants, each driven at three times its budget through all
//     three sidecars for 8 s: Fortnox answers no 429, every request is
//     served within max_wait, and each tenant's token was asked for once
//     for the whole cluster;
//   - a refresh-token chain put through one sidecar and rotated through the
//     others: no refresh token is ever presented twice;
//   - a revocation posted to one sidecar is refused by all three within
//     2 s, and a new consent posted to another lifts it everywhere.
//
// Not parallel, as TestSharedRateBudget: the limiter's margin covers the
// delay between a turn and its arrival at Fortnox on a machine that is not
// starting other tests' processes at the same time.
func TestThreeSidecarsOnACluster(t *testing.T) {
	fake := startFake(t, 0)
	const maxWait = 20 * time.Second
	c := startOnRedisCluster(t, fake, settings{maxWait: maxWait})
	tenants := []string{"1700001", "1700002", "1700003"}
	for _, tn := range tenants {
		fake.GrantConsent(clientID, tn)
	}

	var wg sync.WaitGroup
	for _, tn := range tenants {
		wg.Add(1)
		go func() {
			defer wg.Done()
			checkSharedBudget(t, c, tn, 8*time.Second, maxWait)
		}()
	}
	wg.Wait()
	for _, tn := range tenants {
		if n := fake.TooMany(tn); n != 0 {
			t.Errorf("tenant %s: Fortnox answered %d requests with 429", tn, n)
		}
		if n := fake.TokenRequests("client_credentials", tn); n != 1 {
			t.Errorf("tenant %s: %d token requests through 3 sidecars, want 1", tn, n)
		}
	}

	// A refresh-token chain across the three: put through a, then the
	// token dropped through one sidecar and asked for through the next,
	// so that each rotation happens in another process.
	const chain = "1700009"
	c.sidecars[0].putRefreshToken(chain, fake.IssueRefreshToken(clientID, chain))
	for i := range 6 {
		c.sidecars[i%3].mustServe(chain)
		c.sidecars[(i+1)%3].deleteToken(chain)
		c.sidecars[(i+2)%3].mustServe(chain)
	}
	for _, sc := range c.sidecars {
		sc.mustServe(chain)
	}
	rotations := fake.TokenRequests("refresh_token", chain)
	t.Logf("the chain: %d refreshes through the three sidecars", rotations)
	if rotations < 6 {
		t.Errorf("only %d refreshes of the chain: dropping the token did not make the next sidecar refresh", rotations)
	}
	if n := fake.SpentRefreshTokenReuses(); n != 0 {
		t.Errorf("%d spent refresh tokens were presented again", n)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant answers", n)
	}
	if n := fake.LiveRefreshTokens(clientID, chain, ""); n != 1 {
		t.Errorf("%d live refresh tokens of the chain, want 1", n)
	}

	// Revocation and a new consent reach every sidecar. A tenant of its
	// own: the others' budgets are spent, and polling at their edge would
	// test the margin for the jitter of a busy machine, not the events.
	const tn = "1700005"
	fake.GrantConsent(clientID, tn)
	for _, sc := range c.sidecars {
		sc.mustServe(tn)
	}
	c.sidecars[0].postConsentEvent("client_credentials_consent_revoked", tn)
	took := untilAll(t, c, tn, time.Now(), 2*time.Second, func(a answer) bool {
		return a.status == http.StatusForbidden && errorCode(a) == "consent_revoked"
	})
	t.Logf("revocation posted to a: refused by a, b, c after %v", took)
	c.sidecars[1].postConsentEvent("client_credentials_consent", tn)
	took = untilAll(t, c, tn, time.Now(), 2*time.Second, func(a answer) bool { return a.status == http.StatusOK })
	t.Logf("new consent posted to b: served by a, b, c after %v", took)
	for _, sc := range c.sidecars {
		if lines := sc.logLines("CROSSSLOT"); len(lines) != 0 {
			t.Errorf("%s logged CROSSSLOT: %v", sc.name, lines)
		}
		if lines := sc.logLines("Redis cannot be reached"); len(lines) != 0 {
			t.Errorf("%s counted the Cluster as unreachable: %v", sc.name, lines)
		}
	}
}
