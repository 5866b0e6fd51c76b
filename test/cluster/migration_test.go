package cluster

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// The way into cluster mode: three sidecars without `redis`, each on its
// own pod-local storage, one of them holding a tenant's refresh token (the
// others cannot serve it: the issue's starting point). Restarted with
// `redis`, the record moves to Redis on first use through the sidecar
// that holds it, leaves a tombstone in that sidecar's storage, and serves
// all three. A sidecar asked first, before the move, refuses (its storage
// has no record) and serves once the record has moved.
func TestRecordsMoveToRedisOnFirstUse(t *testing.T) {
	t.Parallel()
	fake := startFake(t, 0)
	rs := testproc.StartRedis(t, redisAOF)
	s := settings{maxWait: 10 * time.Second}
	c := &cluster{t: t, fake: fake, redis: rs}
	for _, name := range []string{"a", "b", "c"} {
		c.sidecars = append(c.sidecars, newSidecar(t, name, fake, s))
	}
	a, b := c.sidecars[0], c.sidecars[1]
	const tenant = "1800001"
	a.putRefreshToken(tenant, fake.IssueRefreshToken(clientID, tenant))
	a.mustServe(tenant)
	if ans := b.get(tenant); ans.status != http.StatusForbidden {
		t.Fatalf("b without redis serves a refresh token stored in a's pod-local storage: %v", ans)
	}
	recordFile := filepath.Join(a.storage, "fortnox", clientID, tenant+".json")
	if raw, err := os.ReadFile(recordFile); err != nil || !strings.Contains(string(raw), `"encrypted"`) {
		t.Fatalf("a's storage holds no encrypted record at %s: %v %.80s", recordFile, err, raw)
	}

	// The rolling upgrade: each stops and comes back with `redis`.
	s.redisURL = rs.URL()
	for _, sc := range c.sidecars {
		sc.stop()
		sc.configure(s)
		sc.start()
	}
	c.waitSubscribed()

	// b first: nothing in Redis yet, nothing in its own storage.
	if ans := b.get(tenant); ans.status != http.StatusForbidden {
		t.Errorf("b before the move: %v, want 403", ans)
	}
	a.mustServe(tenant) // the first use through the holder: the move
	raw, err := os.ReadFile(recordFile)
	if err != nil {
		t.Fatal(err)
	}
	var stone struct {
		MovedTo      string `json:"moved_to"`
		RefreshToken string `json:"refresh_token"`
		Encrypted    string `json:"encrypted"`
	}
	if json.Unmarshal(raw, &stone) != nil || stone.MovedTo != "redis" || stone.RefreshToken != "" || stone.Encrypted != "" {
		t.Errorf("a's storage holds %.120s, want a tombstone that says the record moved to Redis", raw)
	}
	ctx, cancel := redisContext()
	defer cancel()
	if n := c.redisClient().Exists(ctx, "caddy-fortnox:record:{fortnox/"+clientID+"/"+tenant+"}:fortnox/"+clientID+"/"+tenant+".json").Val(); n != 1 {
		t.Error("the record is not in Redis")
	}
	// b retries after its backoff (a second or two, with jitter) and finds
	// the record in Redis; c has not asked before.
	took := untilAll(t, c, tenant, time.Now(), 5*time.Second, func(ans answer) bool { return ans.status == http.StatusOK })
	t.Logf("after the move: a, b, c served the tenant after %v", took)
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
	if n := fake.LiveRefreshTokens(clientID, tenant, ""); n != 1 {
		t.Errorf("%d live refresh tokens, want 1", n)
	}
	// The move spent nothing: the access token from the handover is
	// still fresh, so only the admin PUT's refresh was made.
	if n := fake.TokenRequests("refresh_token", tenant); n != 1 {
		t.Errorf("%d refreshes, want only the handover's", n)
	}
}
