package fortnox

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/redis/go-redis/v9"
)

// Cluster mode as one sidecar sees it: what it shares lands in Redis, in
// the form the other sidecars read (the multi-process tests in
// test/cluster run three). The Redis values hold no plaintext token with
// encryption_key set.

func redisSidecar(t *testing.T, fake *fakefortnox.Server, extra string) (*sidecar, *redis.Client) {
	t.Helper()
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	t.Setenv("FORTNOX_TEST_REDIS_URL", "redis://"+addr+"/0")
	t.Setenv("FORTNOX_TEST_KEY", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
	sc := startSidecar(t, fake, "redis {env.FORTNOX_TEST_REDIS_URL}\nencryption_key {env.FORTNOX_TEST_KEY}\n"+extra)
	client := redis.NewClient(&redis.Options{Addr: addr})
	t.Cleanup(func() { client.Close() })
	return sc, client
}

// redisDump returns every key and value the plugin wrote.
func redisDump(t *testing.T, client *redis.Client) map[string]string {
	t.Helper()
	ctx := context.Background()
	keys, err := client.Keys(ctx, redisstate.RedisKeyPrefix+"*").Result()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, k := range keys {
		switch client.Type(ctx, k).Val() {
		case "string":
			out[k] = client.Get(ctx, k).Val()
		case "hash":
			b, _ := json.Marshal(client.HGetAll(ctx, k).Val())
			out[k] = string(b)
		case "list":
			out[k] = strings.Join(client.LRange(ctx, k, 0, -1).Val(), ",")
		case "set":
			out[k] = strings.Join(client.SMembers(ctx, k).Val(), ",")
		default:
			out[k] = client.Type(ctx, k).Val()
		}
	}
	return out
}

func TestClusterModeSharesThroughRedis(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, client := redisSidecar(t, fake, "")
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("client credentials: %d %s", status, body)
	}
	sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
	if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusOK {
		t.Fatalf("refresh token: %d %s", status, body)
	}
	dump := redisDump(t, client)
	for _, want := range []string{
		redisstate.RedisKeyPrefix + "token:{fortnox/test-client/1234567}:1234567",                           // the shared client-credentials token
		redisstate.RedisKeyPrefix + "record:{fortnox/test-client/7654321}:fortnox/test-client/7654321.json", // the refresh-token record
		redisstate.RedisKeyPrefix + "turns:{fortnox/test-client/1234567}",                                   // the rate budget
		redisstate.RedisKeyPrefix + "index:fortnox/test-client/",                                            // the record index
	} {
		if _, ok := dump[want]; !ok {
			t.Errorf("Redis has no %s (keys: %v)", want, keysOf(dump))
		}
	}
	if _, err := os.Stat(sc.recordPath("7654321")); err == nil {
		t.Error("the record was written to Caddy's storage too")
	}
	for k, v := range dump {
		for _, p := range secretPatterns {
			if p.MatchString(v) {
				t.Errorf("Redis key %s holds a token in plaintext", k)
			}
		}
	}
	// Another process reading the same Redis gets the shared token: drop
	// this one's memory and count token requests.
	before := fake.TokenRequests("", "")
	sc.manager().Cache.Flush()
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	if n := fake.TokenRequests("", "") - before; n != 0 {
		t.Errorf("%d token requests with the token in Redis", n)
	}
}

func keysOf(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// A record still in Caddy's storage from before `redis` was set moves to
// Redis on first use and leaves a tombstone; a sidecar without `redis`
// then refuses clearly instead of spending a dead refresh token.
func TestRecordsMoveToRedisAndLeaveATombstone(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	t.Setenv("FORTNOX_TEST_REDIS_URL", "redis://"+addr)
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	caddyStop(t)

	sc.options = "redis {env.FORTNOX_TEST_REDIS_URL}"
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	advance(fake, time.Hour)
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("after the move: %d %s", status, body)
	}
	raw, _ := os.ReadFile(sc.recordPath("1234567"))
	if _, dead := tokens.IsTombstone(raw); !dead {
		t.Fatalf("Caddy's storage still holds a live record: %s", raw)
	}
	caddyStop(t)
	sc.options = ""
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	advance(fake, time.Hour)
	status, body, resp := sc.get("/3/companyinformation", "1234567")
	if e := errorAnswer(t, resp, body); status != http.StatusServiceUnavailable || !strings.Contains(e.Message, "redis") {
		t.Errorf("a sidecar without redis after the move: %d %s", status, body)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
}

// caddy fortnox export and import copy the records, still encrypted,
// between Redis and Caddy's storage in either direction: a backup, and the
// way back.
func TestExportAndImportRecords(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc, client := redisSidecar(t, fake, "")
	for _, tn := range []string{"1234567", "7654321"} {
		sc.putRefreshToken(tn, fake.IssueRefreshToken(testClientID, tn))
	}
	run := func(args ...string) string {
		t.Helper()
		var out strings.Builder
		c := transferCommand(args[0])
		c.SetOut(&out)
		c.SetArgs(append([]string{"--address", strings.TrimPrefix(sc.adminURL, "http://")}, args[1:]...))
		if err := c.Execute(); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out.String())
		}
		return out.String()
	}
	if out := run("export"); !strings.Contains(out, "export: 2 records copied, 0 skipped, 0 failed") {
		t.Fatalf("export: %s", out)
	}
	raw, err := os.ReadFile(sc.recordPath("1234567"))
	if err != nil || !strings.Contains(string(raw), tokens.EncryptionAlgorithm) {
		t.Fatalf("the exported record is not there, encrypted: %v %s", err, raw)
	}
	// Redis loses everything (a disaster); the backup goes back in.
	if err := client.FlushDB(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	sc.manager().Cache.Flush()
	if out := run("import"); !strings.Contains(out, "import: 2 records copied") {
		t.Fatalf("import: %s", out)
	}
	raw, _ = os.ReadFile(sc.recordPath("1234567"))
	if _, dead := tokens.IsTombstone(raw); !dead {
		t.Errorf("no tombstone after the import: %s", raw)
	}
	if out := run("import"); !strings.Contains(out, "0 records copied, 2 skipped") {
		t.Errorf("a second import: %s", out)
	}
	advance(fake, time.Hour)
	for _, tn := range []string{"1234567", "7654321"} {
		if status, body, _ := sc.get("/3/companyinformation", tn); status != http.StatusOK {
			t.Errorf("%s after the round trip: %d %s", tn, status, body)
		}
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
}

// A tenant without a service-account consent costs the cluster one
// client-credentials request, not one per sidecar: the token the refresh
// token gave is shared with its grant, and the others go straight to it.
func TestClusterSharesThatATenantIsOnItsRefreshToken(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc, _ := redisSidecar(t, fake, "")
	sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
	if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	if n := fake.TokenRequests("client_credentials", "7654321"); n != 1 {
		t.Fatalf("%d client-credentials requests, want 1", n)
	}
	// Another sidecar: nothing in its memory.
	m := sc.manager()
	m.Cache.Flush()
	m.Ledger().Clear()
	if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	if n := fake.TokenRequests("", "7654321"); n != 2 { // the hand-over's refresh and one client-credentials try
		t.Errorf("%d token requests for the tenant, want 2: the second sidecar asked again", n)
	}
}

// The shared rate budget runs on Redis's clock. A sidecar whose clock is
// a second slow (or that was held up between reading its clock and the
// script running) used to reserve turns a second in the past, so that a
// sidecar with the right clock sent the 26th request a second early and
// Fortnox answered 429.
func TestSharedRateBudgetKeepsRedisClockNotTheSidecars(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{}) // Fortnox's limit: 25 per 5 s
	fake.GrantConsent(testClientID, "1234567")
	sc, _ := redisSidecar(t, fake, "max_wait 15s\n")
	get := func() {
		if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
			t.Errorf("%d %s", status, body)
		}
	}
	// The pod with the slow clock takes the window's 25 turns at once.
	skew := 1500 * time.Millisecond
	clk.Advance(-skew)
	restored := false
	t.Cleanup(func() {
		if !restored {
			clk.Advance(skew)
		}
	})
	var wg sync.WaitGroup
	for range defaultRateRequests {
		wg.Go(get)
	}
	wg.Wait()
	// A pod with the right clock sends the 26th.
	clk.Advance(skew)
	restored = true
	get()
	if n := fake.TooMany(""); n != 0 {
		t.Errorf("Fortnox answered %d requests with 429: a sidecar's clock decided the window", n)
	}
	reqs := fake.APIRequests()
	if len(reqs) != defaultRateRequests+1 {
		t.Fatalf("%d requests reached Fortnox, want %d", len(reqs), defaultRateRequests+1)
	}
}

// A 429 from Fortnox pauses the tenant for the whole cluster: the pause is
// written to Redis a window ahead on Redis's clock, whatever the clock of
// the sidecar that met the 429 says (here 3 s slow).
func TestFortnox429PausesTheClusterOnRedisClock(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{})
	fake.GrantConsent(testClientID, "1234567")
	sc, client := redisSidecar(t, fake, "")
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	fake.SetRateLimit(1, time.Minute) // something else used the tenant's budget
	skew := 3 * time.Second
	clk.Advance(-skew)
	status, _, resp := sc.get("/3/companyinformation", "1234567")
	clk.Advance(skew)
	if status != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "5" {
		t.Fatalf("Fortnox's 429: %d, Retry-After %q", status, resp.Header.Get("Retry-After"))
	}
	// Writing the pause is no Redis outage (a script that failed to
	// compile once made every 429 look like one).
	if lines := sc.logLinesStarting("Redis cannot be reached"); len(lines) != 0 {
		t.Errorf("a 429 was logged as a Redis outage: %v", lines)
	}
	ctx := context.Background()
	until, err := client.Get(ctx, redisstate.TurnsKey(testClientID, "1234567")+":pause").Int64()
	if err != nil {
		t.Fatalf("no pause in Redis: %v", err)
	}
	redisNow, err := client.Time(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	if left := time.Duration(until-redisNow.UnixMilli()) * time.Millisecond; left < 4*time.Second || left > 5*time.Second {
		t.Errorf("the pause ends %v from now on Redis's clock, want the 5 s window", left)
	}
}

// The admin API in cluster mode reads and writes Redis: the tenants list,
// dropping a token, deleting an account and the quarantine all act on the
// shared records, not on this sidecar's Caddy storage.
func TestAdminAPIActsOnRedis(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc, client := redisSidecar(t, fake, "")
	ctx := context.Background()
	exists := func(key string) bool { return client.Exists(ctx, redisstate.RecordKey(key)).Val() == 1 }
	indexed := func(key string) bool {
		return client.SIsMember(ctx, redisstate.RedisKeyPrefix+"index:"+tokens.RecordPrefix(testClientID), key).Val()
	}

	sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	tenantKey := tokens.RecordKey(testClientID, tokens.Subject{Tenant: "7654321"})
	annaKey := tokens.RecordKey(testClientID, tokens.Subject{Tenant: "1234567", Account: "anna"})
	for _, key := range []string{tenantKey, annaKey} {
		if !exists(key) || !indexed(key) {
			t.Fatalf("%s is not in Redis (stored %v, indexed %v)", key, exists(key), indexed(key))
		}
	}
	if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}

	// The tenants list comes from Redis: this sidecar's storage has nothing.
	sc.manager().Cache.Flush()
	listed := map[string]tokens.TenantInfo{}
	for _, info := range sc.tenants() {
		listed[info.Tenant] = info
	}
	if info, ok := listed["7654321"]; !ok || !info.HasRefreshToken {
		t.Errorf("GET /fortnox/tenants: 7654321 is %+v", info)
	}
	if info, ok := listed["1234567"]; !ok || len(info.Accounts) != 1 || info.Accounts[0].Name != "anna" {
		t.Errorf("GET /fortnox/tenants: 1234567 is %+v", info)
	}

	// Dropping a token clears it in the shared record: the next request
	// refreshes.
	refreshes := fake.TokenRequests("refresh_token", "7654321")
	if status, body := sc.admin(http.MethodDelete, "/fortnox/tenants/7654321/token", ""); status != http.StatusNoContent {
		t.Fatalf("DELETE token: %d %s", status, body)
	}
	if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusOK {
		t.Fatalf("after DELETE token: %d %s", status, body)
	}
	if n := fake.TokenRequests("refresh_token", "7654321") - refreshes; n != 1 {
		t.Errorf("%d refreshes after the token was dropped, want 1", n)
	}

	// And the shared token of a client-credentials tenant: the next
	// request fetches a new one rather than reading the dropped one back.
	fake.GrantConsent(testClientID, "1111111")
	if status, body, _ := sc.get("/3/companyinformation", "1111111"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	minted := fake.TokenRequests("client_credentials", "1111111")
	if status, body := sc.admin(http.MethodDelete, "/fortnox/tenants/1111111/token", ""); status != http.StatusNoContent {
		t.Fatalf("DELETE token: %d %s", status, body)
	}
	if n := client.Exists(ctx, redisstate.TokenKey(testClientID, tokens.Subject{Tenant: "1111111"})).Val(); n != 0 {
		t.Error("the dropped token is still shared in Redis")
	}
	if status, body, _ := sc.get("/3/companyinformation", "1111111"); status != http.StatusOK {
		t.Fatalf("after DELETE token: %d %s", status, body)
	}
	if n := fake.TokenRequests("client_credentials", "1111111") - minted; n != 1 {
		t.Errorf("%d token requests after the token was dropped, want 1", n)
	}

	// Deleting an account removes its shared record.
	if status, body := sc.admin(http.MethodDelete, "/fortnox/tenants/1234567/accounts/anna", ""); status != http.StatusNoContent {
		t.Fatalf("DELETE account: %d %s", status, body)
	}
	if exists(annaKey) || indexed(annaKey) {
		t.Errorf("the deleted account is still in Redis (stored %v, indexed %v)", exists(annaKey), indexed(annaKey))
	}

	// A token handed over for the wrong tenant, whose own tenant has a
	// live one, is quarantined in Redis, listed, and removable.
	status, body := sc.admin(http.MethodPut, "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"`+fake.IssueRefreshToken(testClientID, "7654321")+`"}`)
	if status != http.StatusConflict {
		t.Fatalf("PUT another tenant's token: %d %s", status, body)
	}
	q := sc.quarantine()
	if len(q) != 1 {
		t.Fatalf("quarantine: %+v", q)
	}
	qKey := tokens.QuarantineKey(testClientID, q[0].ID)
	if !exists(qKey) {
		t.Fatalf("the quarantine record %s is not in Redis", qKey)
	}
	if status, body := sc.admin(http.MethodDelete, "/fortnox/quarantine/"+q[0].ID, ""); status != http.StatusNoContent {
		t.Fatalf("DELETE quarantine: %d %s", status, body)
	}
	if exists(qKey) {
		t.Error("the deleted quarantine record is still in Redis")
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant: a refresh token was used twice", n)
	}
}

// After a reconnect, one sidecar revalidates a few hundred subjects within
// a second against a near Redis (issue "The shared store may fail", item
// 3): the accounts whose records are gone are forgotten, the tokens the
// store holds newer ones of are dropped, and a token the store never held
// (fetched while Redis was unreachable) is kept.
func TestResyncRevalidatesHundredsOfSubjectsWithinASecond(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, _ := redisSidecar(t, fake, "")
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	m := sc.manager()
	const n = 100
	now := m.Clock().Now()
	ctx := context.Background()
	var kept, replaced, deleted []tokens.Subject
	for i := range n {
		k := tokens.Subject{Tenant: fmt.Sprintf("31%05d", i)}
		m.CacheToken(k, tokens.GrantClientCredentials, fmt.Sprintf("kept-%d", i), now.Add(-time.Minute), time.Hour, 5*time.Minute)
		kept = append(kept, k)
		r := tokens.Subject{Tenant: fmt.Sprintf("32%05d", i)}
		m.CacheToken(r, tokens.GrantClientCredentials, fmt.Sprintf("old-%d", i), now.Add(-time.Minute), time.Hour, 5*time.Minute)
		if err := m.Shared().StoreToken(ctx, r, &tokens.SharedToken{AccessToken: fmt.Sprintf("new-%d", i), Grant: tokens.GrantClientCredentials,
			IssuedAt: now.UTC(), ExpiresAt: now.Add(time.Hour).UTC()}); err != nil {
			t.Fatal(err)
		}
		replaced = append(replaced, r)
		d := tokens.Subject{Tenant: "1234567", Account: fmt.Sprintf("user%d", i)}
		m.CacheToken(d, tokens.GrantRefreshToken, fmt.Sprintf("gone-%d", i), now.Add(-time.Minute), time.Hour, 5*time.Minute)
		deleted = append(deleted, d)
	}
	cached := func(subjects []tokens.Subject) (k int) {
		for _, s := range subjects {
			if _, ok := m.Cache.Get(s.Key()); ok {
				k++
			}
		}
		return k
	}
	start := time.Now()
	go m.Resync() // as a reconnect does; a pass already running runs one more
	for cached(replaced) > 0 || cached(deleted) > 0 {
		if time.Since(start) > time.Second {
			t.Fatalf("1 s after the resync began: %d of %d replaced tokens and %d of %d deleted accounts' tokens still cached",
				cached(replaced), n, cached(deleted), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("%d subjects revalidated in %v", 3*n+1, time.Since(start).Round(time.Millisecond))
	if k := cached(kept); k != n {
		t.Errorf("%d of %d tokens the store never held were dropped", n-k, n)
	}
	for _, d := range deleted[:3] {
		if m.Ledger().Knows(d.Key()) {
			t.Errorf("%s is still remembered", d)
		}
	}
}

// A refresh-token record that an earlier version left at its Redis key
// from before the hash tags is served: the next refresh moves it to its
// tagged key and leaves a tombstone at the old one (so that a sidecar
// still on the earlier version refuses), and no refresh token is spent
// twice.
func TestRecordAtItsOldRedisKeyMoves(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc, client := redisSidecar(t, fake, "")
	ctx := context.Background()
	const tenant = "7654321"
	key := tokens.RecordKey(testClientID, tokens.Subject{Tenant: tenant})
	oldKey := redisstate.RedisKeyPrefix + "record:" + key
	sc.putRefreshToken(tenant, fake.IssueRefreshToken(testClientID, tenant))
	// What an earlier version leaves: the record at its old key only.
	raw, err := client.Get(ctx, redisstate.RecordKey(key)).Bytes()
	if err != nil {
		t.Fatalf("the record is not at its tagged key: %v", err)
	}
	if err := client.Set(ctx, oldKey, raw, 0).Err(); err != nil {
		t.Fatal(err)
	}
	client.Del(ctx, redisstate.RecordKey(key))
	// Dropping the token makes the next request refresh, reading the record.
	if status, body := sc.admin(http.MethodDelete, "/fortnox/tenants/"+tenant+"/token", ""); status != http.StatusNoContent {
		t.Fatalf("DELETE token: %d %s", status, body)
	}
	before := fake.TokenRequests("refresh_token", tenant)
	if status, body, _ := sc.get("/3/companyinformation", tenant); status != http.StatusOK {
		t.Fatalf("a record at its old key: %d %s", status, body)
	}
	if n := fake.TokenRequests("refresh_token", tenant) - before; n != 1 {
		t.Errorf("%d refreshes after the token was dropped, want 1 (from the moved record)", n)
	}
	if n := client.Exists(ctx, redisstate.RecordKey(key)).Val(); n != 1 {
		t.Error("the record did not move to its tagged key")
	}
	old, _ := client.Get(ctx, oldKey).Bytes()
	if stone, dead := tokens.IsTombstone(old); !dead || !strings.Contains(stone.MovedTo, "upgrade this sidecar") {
		t.Errorf("the old key holds %.80q, want a tombstone that says to upgrade", old)
	}
	if n := fake.SpentRefreshTokenReuses(); n != 0 {
		t.Errorf("%d spent refresh tokens presented again", n)
	}
}
