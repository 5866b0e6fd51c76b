package redisstate

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/ratelimit"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// shareOwner is limiterOwner with a client id of its own.
type shareOwner struct {
	limiterOwner
	id string
}

func (o shareOwner) ClientID() string { return o.id }

// shortHeartbeats makes the registry beat every 100 ms for this test
// (call before New; restored after the test's Conns are destroyed).
func shortHeartbeats(t *testing.T) {
	t.Helper()
	saved := heartbeatEvery
	heartbeatEvery = 100 * time.Millisecond
	t.Cleanup(func() { heartbeatEvery = saved })
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 5 s: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// admitted counts how many of n turns for tenant l admits at once (max
// wait 0), failing on anything but a *ratelimit.Error.
func admitted(t *testing.T, l *Limiter, tenant string, n int) int {
	t.Helper()
	ok := 0
	for range n {
		_, err := l.Wait(context.Background(), tenant, 0)
		var rl *ratelimit.Error
		switch {
		case err == nil:
			ok++
		case errors.As(err, &rl):
		default:
			t.Fatalf("turn for %s: %v", tenant, err)
		}
	}
	return ok
}

// Three sidecars of one client id register in Redis (once each however
// often they beat; a sidecar not seen for a minute is dropped), so N = 3.
// With Redis killed each keeps to floor(25/3) = 8 per 5 s window per
// tenant, not 25, window after window, after a window of nothing (the
// turns Redis gave before it died may still be in Fortnox's window, see
// outageGate). Once Redis is back (its turn log
// forgotten: it is not persisted), each still keeps to
// 8 for a window, and the script counts those turns; then the shared
// budget alone holds again: 25 per window for the three together, however
// they split it. A sidecar that stops leaves the registry.
func TestFallbackKeepsEachSidecarsShareOfTheBudget(t *testing.T) {
	r, client := startLimiterRedis(t)
	shortHeartbeats(t)
	ctx := context.Background()
	const limit, window = 25, 5 * time.Second
	clk := clock.New() // the sidecars' clock (their in-process windows)
	owner := shareOwner{limiterOwner{clk: clk}, "share-test"}
	key := RedisKeyPrefix + "sidecars:" + tokens.RecordPrefix(owner.id)

	// A sidecar last seen 61 s ago is not counted, and is trimmed.
	redisNow := redisMillis(t, client)
	if err := client.ZAdd(ctx, key, redis.Z{Score: float64(redisNow - 61_000), Member: "gone"}).Err(); err != nil {
		t.Fatal(err)
	}
	opts, err := ParseRedisURL(r.URL())
	if err != nil {
		t.Fatal(err)
	}
	var conns [3]*Conn
	var lims [3]*Limiter
	for i := range conns {
		conns[i] = New(t.Name(), owner, opts, r.URL(), zap.NewNop(), func() {})
		c := conns[i]
		t.Cleanup(func() { _ = c.Destruct() })
		lims[i] = NewLimiter(c, limit, window, ratelimit.New(limit, window, clk))
	}
	for i, c := range conns {
		waitFor(t, "each sidecar reads N = 3", func() bool { return c.Sidecars() == 3 })
		if got := lims[i].Share(); got != 8 {
			t.Fatalf("sidecar %d: share %d, want floor(25/3) = 8", i, got)
		}
	}
	time.Sleep(5 * heartbeatEvery) // more beats: still three members
	members, err := client.ZRange(ctx, key, 0, -1).Result()
	if err != nil || len(members) != 3 {
		t.Fatalf("registry %s holds %v (%v), want the three sidecars' origins", key, members, err)
	}
	for i, c := range conns {
		if c.Sidecars() != 3 {
			t.Fatalf("sidecar %d counts %d sidecars after more heartbeats", i, c.Sidecars())
		}
	}
	// Move past the window that follows their start (see below).
	clk.Advance(window + outageProbeEvery)

	// Redis gone. For a window after the outage began, nothing: the turns
	// Redis gave just before it still count in Fortnox's window, and no
	// sidecar can see the others' (outageGate)...
	r.Kill()
	for i, l := range lims {
		if got := admitted(t, l, "a", limit); got != 0 {
			t.Fatalf("the window Redis went down in, sidecar %d: %d admitted, want 0", i, got)
		}
	}
	clk.Advance(window)
	// ...then 8 per window per tenant each, not 25.
	for window := range 2 {
		for i, l := range lims {
			for _, tenant := range []string{"a", "b"} {
				if got := admitted(t, l, tenant, limit); got != 8 {
					t.Fatalf("Redis down, window %d, sidecar %d, tenant %s: %d of 25 admitted, want 8", window+1, i, tenant, got)
				}
			}
			if !conns[i].Down() {
				t.Fatalf("sidecar %d does not know Redis is down", i)
			}
			if n := conns[i].Sidecars(); n != 3 {
				t.Fatalf("Redis down: sidecar %d forgot N (%d)", i, n)
			}
		}
		clk.Advance(5 * time.Second)
	}

	// Redis back, without the log (it is kept out of the AOF).
	if err := r.Restart(); err != nil {
		t.Fatal(err)
	}
	for i, c := range conns {
		waitFor(t, "each sidecar notices Redis is back", func() bool { return !c.Down() })
		_ = i
	}
	// For a window after that, each keeps to its share all the same...
	for i, l := range lims {
		if got := admitted(t, l, "a", limit); got != 8 {
			t.Fatalf("a window after Redis came back, sidecar %d: %d of 25 admitted, want 8", i, got)
		}
	}
	// ...and those turns reached the script's log.
	if n, _ := client.StrLen(ctx, TurnsKey(owner.id, "a")).Result(); n != 24*13 {
		t.Fatalf("the log holds %d turns of the share's window, want 24", n/13)
	}
	// Then the script alone: it counts those 24 (Redis's clock has not
	// moved a window), so one more goes in the whole cluster...
	clk.Advance(window + outageProbeEvery)
	total := 0
	for _, l := range lims {
		total += admitted(t, l, "a", 5)
	}
	if total != 1 {
		t.Fatalf("the shared budget after the share's window: %d more admitted, want 1 (25 - 24)", total)
	}
	// ...and on a fresh tenant the three share 25, split any way: the
	// first sidecar takes 20, far past its share.
	if got := admitted(t, lims[0], "c", 20); got != 20 {
		t.Fatalf("Redis up: the first sidecar got %d of 20 of the shared budget", got)
	}
	if got := admitted(t, lims[1], "c", 10) + admitted(t, lims[2], "c", 10); got != 5 {
		t.Fatalf("Redis up: the others got %d after 20, want 5", got)
	}

	// A sidecar that stops leaves the registry; the others read N = 2.
	if err := conns[2].Destruct(); err != nil {
		t.Fatal(err)
	}
	for i, c := range conns[:2] {
		waitFor(t, "the two left read N = 2", func() bool { return c.Sidecars() == 2 })
		if got := lims[i].Share(); got != 12 {
			t.Fatalf("sidecar %d: share %d of two, want 12", i, got)
		}
	}
}

// Redis dies while two sidecars have a tenant's budget spent and turns
// queued in its log (reserved for later, their requests asleep until
// then). Those turns still go to Fortnox after Redis is gone, and each
// sidecar knows only its own: so neither admits a turn of its share before
// every turn Redis could have given is out of the window (the queue
// reached max_wait ahead at most). Every admission of both, before and
// after the outage, keeps to 3 per window.
func TestOutageKeepsTheTurnsRedisGaveBeforeIt(t *testing.T) {
	r, _ := startLimiterRedis(t)
	shortHeartbeats(t)
	const limit, window, maxWait = 3, 500 * time.Millisecond, time.Second
	clk := clock.New()
	owner := shareOwner{limiterOwner{clk: clk}, "outage-test"}
	opts, err := ParseRedisURL(r.URL())
	if err != nil {
		t.Fatal(err)
	}
	var lims [2]*Limiter
	for i := range lims {
		c := New(t.Name(), owner, opts, r.URL(), zap.NewNop(), func() {})
		t.Cleanup(func() { _ = c.Destruct() })
		lims[i] = NewLimiter(c, limit, window, ratelimit.New(limit, window, clk))
	}
	for _, l := range lims {
		waitFor(t, "both sidecars read N = 2", func() bool { return l.c.Sidecars() == 2 })
	}
	time.Sleep(window + outageProbeEvery) // past the window after their start

	var mu sync.Mutex
	var sent []time.Time
	take := func(l *Limiter, until time.Time) {
		for time.Now().Before(until) {
			_, err := l.Wait(context.Background(), "t", maxWait)
			var rl *ratelimit.Error
			switch {
			case err == nil:
				mu.Lock()
				sent = append(sent, time.Now())
				mu.Unlock()
				return
			case errors.As(err, &rl):
				time.Sleep(min(rl.RetryAfter, time.Until(until)))
			default:
				t.Errorf("turn: %v", err)
				return
			}
		}
	}
	var wg sync.WaitGroup
	start := time.Now()
	// The budget spent and three turns queued behind it, split over both.
	for i := range 2 * limit {
		wg.Add(1)
		go func() { defer wg.Done(); take(lims[i%2], start.Add(maxWait)) }()
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	r.Kill()
	// Both go on asking through the outage.
	for i := range 4 * limit {
		wg.Add(1)
		go func() { defer wg.Done(); take(lims[i%2], start.Add(4*time.Second)) }()
		time.Sleep(20 * time.Millisecond)
	}
	wg.Wait()
	slices.SortFunc(sent, func(a, b time.Time) int { return a.Compare(b) })
	if len(sent) < 2*limit+2 {
		t.Fatalf("%d turns in 4 s, want the 6 before the outage and some of the shares after it", len(sent))
	}
	const slack = 20 * time.Millisecond
	for i := limit; i < len(sent); i++ {
		if d := sent[i].Sub(sent[i-limit]); d < window-slack {
			t.Errorf("turns %d and %d %v apart: %d in one window (turns at %v)", i-limit+1, i+1, d, limit+1, offsets(start, sent))
		}
	}
}

func offsets(start time.Time, ts []time.Time) []time.Duration {
	out := make([]time.Duration, len(ts))
	for i, t := range ts {
		out[i] = t.Sub(start).Round(time.Millisecond)
	}
	return out
}
