package fortnox

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/redis/go-redis/v9"
)

// `redis { sentinel … }` against real processes: a primary, its replica
// and three Sentinels. The primary is killed (SIGKILL) while the sidecar
// is asked for two tenants whose tokens have expired; the sidecar, never
// restarted, serves both again within 5 s of the Sentinels naming the
// replica, and the refresh-token record it handed over to Redis before
// the failover (replicated, WAIT 1) is the one it uses.
func TestSentinelFailoverKeepsServing(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	s := testproc.StartSentinel(t, testproc.SentinelConfig{Node: testproc.RedisConfig{AppendOnly: true}})
	t.Setenv("FORTNOX_TEST_SENTINELS", strings.Join(s.SentinelAddrs(), ","))
	t.Setenv("FORTNOX_TEST_KEY", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
	sc := startSidecar(t, fake, "redis {\nsentinel "+s.MasterName()+" {env.FORTNOX_TEST_SENTINELS}\n}\nencryption_key {env.FORTNOX_TEST_KEY}")

	// Before: client credentials, and a refresh token handed over and
	// rotated once; the rotated one is in Redis only.
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("client credentials: %d %s", status, body)
	}
	sc.putRefreshToken("7654321", fake.IssueRefreshToken(testClientID, "7654321"))
	if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusOK {
		t.Fatalf("refresh token: %d %s", status, body)
	}
	ctx := context.Background()
	primary, err := s.Primary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pc := redis.NewClient(&redis.Options{Addr: primary, MaxRetries: -1})
	defer pc.Close()
	recordKey := redisstate.RecordKey("fortnox/test-client/7654321.json")
	if n, err := pc.Exists(ctx, recordKey).Result(); err != nil || n != 1 {
		t.Fatalf("the primary has no %s: %d %v", recordKey, n, err)
	}
	// The replica has everything written so far once it has this write
	// (WAIT counts this connection's writes, in order).
	if err := pc.Set(ctx, "caddy-fortnox-test:replicated", "1", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if n, err := pc.Wait(ctx, 1, 5*time.Second).Result(); err != nil || n < 1 {
		t.Fatalf("WAIT 1: %d replicas, %v", n, err)
	}
	refreshes := fake.TokenRequests("refresh_token", "7654321")
	invalid := fake.TokenErrors("invalid_grant")

	old := s.KillPrimary(t)
	killed := time.Now()
	// Both tenants' access tokens expire: the refresh-token tenant now
	// needs its record and its lock from Redis.
	advance(fake, 2*time.Hour)

	// Watch the Sentinels: when do they name another primary?
	var named atomic.Int64 // unix ns
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go func() {
		for watchCtx.Err() == nil {
			c, cancel := context.WithTimeout(watchCtx, time.Second)
			p, err := s.Primary(c)
			cancel()
			if err == nil && p != old {
				named.Store(time.Now().UnixNano())
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	var during []int // statuses before the new primary was named
	var tries []string
	var served time.Time
	for {
		ok := true
		for _, tenant := range []string{"7654321", "1234567"} {
			start := time.Now()
			status, body, _ := sc.get("/3/companyinformation", tenant)
			tries = append(tries, fmt.Sprintf("%s at +%v: %d in %v", tenant, start.Sub(killed).Round(time.Millisecond), status, time.Since(start).Round(time.Millisecond)))
			if status != http.StatusOK {
				ok = false
				if named.Load() == 0 {
					during = append(during, status)
				}
				if status != http.StatusServiceUnavailable && status != http.StatusOK {
					t.Errorf("tenant %s during the failover: %d %s", tenant, status, body)
				}
				break
			}
		}
		if n := named.Load(); n != 0 && ok {
			served = time.Now()
			break
		}
		if n := named.Load(); n != 0 && time.Since(time.Unix(0, n)) > 10*time.Second {
			t.Fatalf("not served 10 s after the new primary was named (%v after the kill)", time.Since(killed))
		}
		if time.Since(killed) > 45*time.Second {
			t.Fatal("the Sentinels named no new primary within 45 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	namedAt := time.Unix(0, named.Load())
	newPrimary := s.WaitNewPrimary(t, old, 5*time.Second)
	t.Logf("primary %s killed; %s named after %v; served again %v after that (statuses meanwhile: %v)",
		old, newPrimary, namedAt.Sub(killed).Round(time.Millisecond), served.Sub(namedAt).Round(time.Millisecond), during)
	t.Logf("requests: %s", strings.Join(tries, "; "))
	if d := served.Sub(namedAt); d > 5*time.Second {
		t.Errorf("served again %v after the new primary was named, want within 5 s", d)
	}
	// The record handed over before the failover was the one used: one
	// more refresh, accepted.
	if n := fake.TokenRequests("refresh_token", "7654321") - refreshes; n != 1 {
		t.Errorf("%d refresh-token requests after the failover, want 1", n)
	}
	if n := fake.TokenErrors("invalid_grant") - invalid; n != 0 {
		t.Errorf("%d invalid_grant answers after the failover", n)
	}
	// And the rotated token reached the new primary.
	nc := redis.NewClient(&redis.Options{Addr: newPrimary, MaxRetries: -1})
	defer nc.Close()
	if n, err := nc.Exists(ctx, recordKey).Result(); err != nil || n != 1 {
		t.Errorf("the new primary has no %s: %d %v", recordKey, n, err)
	}
	// The log names the Sentinel setting, never a password.
	found := false
	for _, l := range sc.logLinesWhere(func(string) bool { return true }) {
		if v, _ := l["redis"].(string); strings.HasPrefix(v, "sentinel "+s.MasterName()+" 127.0.0.1:") {
			found = true
			break
		}
	}
	if !found {
		t.Errorf("no log line names the Sentinel setting (redis: sentinel %s …)", s.MasterName())
	}
}
