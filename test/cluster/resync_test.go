package cluster

import (
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// deleteAdmin sends DELETE path to the sidecar's admin API and fails
// unless it answers 204.
func (sc *sidecar) deleteAdmin(path string) {
	sc.t.Helper()
	req, _ := http.NewRequest(http.MethodDelete, sc.adminURL+path, nil)
	resp, err := client.Do(req)
	if err != nil {
		sc.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		b, _ := io.ReadAll(resp.Body)
		sc.t.Fatalf("%s: DELETE %s: %d %s", sc.name, path, resp.StatusCode, b)
	}
}

// deletedAccount is how a sidecar answers a request as an account that has
// no refresh token (deleted): 403 account_not_authorized.
func deletedAccount(a answer) bool {
	return a.status == http.StatusForbidden && errorCode(a) == "account_not_authorized"
}

// relayedPair is two sidecars on one Redis, the second (b) reaching it
// through a relay that a test can cut.
func relayedPair(t *testing.T) (a, b *sidecar, relay *testproc.Relay) {
	t.Helper()
	fake := startFake(t, 0)
	buildCaddy(t)
	rs := testproc.StartRedis(t, redisAOF)
	relay = testproc.StartRelay(t, rs.Addr())
	const maxWait = 10 * time.Second
	a = newSidecar(t, "a", fake, settings{redisURL: rs.URL(), maxWait: maxWait})
	b = newSidecar(t, "b", fake, settings{redisURL: "redis://" + relay.Addr() + "/0", maxWait: maxWait})
	c := &cluster{t: t, fake: fake, redis: rs, sidecars: []*sidecar{a, b}}
	c.waitSubscribed()
	return a, b, relay
}

// Pub/sub is the fast path, the store is the truth (issue "The shared
// store may fail", item 3): a sidecar whose link to Redis comes back
// revalidates what it holds. Here b's link is cut while a deletes a named
// account, so b misses its `forget`: within 1 s of the link coming back, b
// answers the account as a deleted account (403 account_not_authorized),
// and never 200 again.
func TestReconnectForgetsADeletedAccount(t *testing.T) {
	t.Parallel()
	a, b, relay := relayedPair(t)
	fake := a.fake
	const tenant = "1900001"
	fake.GrantConsent(clientID, tenant)
	a.putAccountRefreshToken(tenant, "anna", fake.IssueUserRefreshToken(clientID, tenant, "7"))
	for _, sc := range []*sidecar{a, b} {
		if r := sc.getAs(tenant, "anna"); r.status != http.StatusOK {
			t.Fatalf("%s as anna before the cut: %v", sc.name, r)
		}
	}

	relay.Cut()
	cut := time.Now()
	a.deleteAdmin("/fortnox/tenants/" + tenant + "/accounts/anna")
	if r := a.getAs(tenant, "anna"); !deletedAccount(r) {
		t.Fatalf("a as anna after deleting it: %v", r)
	}
	// b, cut off, cannot know: it keeps serving anna from its cache (the
	// contract is about the link coming back, not before).
	for time.Since(cut) < 2*time.Second {
		if r := b.getAs(tenant, "anna"); r.status != http.StatusOK {
			t.Logf("b as anna while cut off: %v", r)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err := relay.Restore(); err != nil {
		t.Fatal(err)
	}
	restored := time.Now()
	// A request every 200 ms: inside the tenant's budget (25 per 5 s) while
	// b still serves the account.
	var stopped time.Duration = -1
	for time.Since(restored) < 3*time.Second {
		r := b.getAs(tenant, "anna")
		switch {
		case deletedAccount(r):
			if stopped < 0 {
				stopped = time.Since(restored)
			}
		case r.status == http.StatusOK && stopped >= 0:
			t.Errorf("b served the deleted account again %v after the link came back (it had stopped after %v)", time.Since(restored).Round(time.Millisecond), stopped.Round(time.Millisecond))
		case r.status != http.StatusOK:
			t.Errorf("b as anna %v after the link came back: %v", time.Since(restored).Round(time.Millisecond), r)
		}
		time.Sleep(200 * time.Millisecond)
	}
	switch {
	case stopped < 0:
		t.Fatalf("b still served the deleted account 3 s after its link to Redis came back")
	case stopped > time.Second:
		t.Errorf("b stopped serving the deleted account %v after its link came back, want within 1 s", stopped.Round(time.Millisecond))
	}
	t.Logf("deleted account: b stopped serving it %v after its link to Redis came back", stopped.Round(time.Millisecond))
}

// The same for a 401 invalidation: while b's link is cut, a meets a 401
// on the service account's token, drops it from the store and replaces it,
// and b misses the `invalidate`. Within 1 s of its link coming back, b
// sends the new token, never the one Fortnox refused (no 401 of its own,
// no token request of its own).
func TestReconnectDropsAnInvalidatedToken(t *testing.T) {
	t.Parallel()
	a, b, relay := relayedPair(t)
	fake := a.fake
	const tenant = "1900002"
	fake.GrantConsent(clientID, tenant)
	for _, sc := range []*sidecar{a, b} {
		sc.mustServe(tenant)
	}
	if n := fake.TokenRequests("client_credentials", tenant); n != 1 {
		t.Fatalf("%d token requests before the revocation, want the cluster's one", n)
	}
	// Past the 10 s in which a 401 is not held against a token just
	// minted (the sidecars' clocks cannot be moved: they are processes).
	time.Sleep(11 * time.Second)

	relay.Cut()
	fake.RevokeAccessTokens(clientID, tenant)
	a.mustServe(tenant) // 401, dropped from the store, replayed with a new token
	if n := fake.Unauthorized(tenant); n != 1 {
		t.Fatalf("a met %d 401s, want 1", n)
	}
	time.Sleep(time.Second) // the broadcast does not reach b
	if err := relay.Restore(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // within 1 s of the link coming back
	for range 3 {
		b.mustServe(tenant)
	}
	if n := fake.Unauthorized(tenant); n != 1 {
		t.Errorf("Fortnox answered %d requests with 401, want 1: b sent the refused token after its link came back", n)
	}
	if n := fake.TokenRequests("client_credentials", tenant); n != 2 {
		t.Errorf("%d token requests, want 2: one before and one after the revocation, for the whole cluster", n)
	}
}
