package redisstate

import (
	"context"
	"errors"
	"math/rand/v2"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/ratelimit"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// firstTurnScript is the turn script before the rewrite: the reference
// the current one must agree with, turn for turn, also when both share a
// log (sidecars of both versions during an upgrade).
var firstTurnScript = redis.NewScript(FirstTurnScriptSource)

func startLimiterRedis(t *testing.T) (*testproc.Redis, *redis.Client) {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatal("redis-server is not on PATH: install it (apt-get install redis-server; CI does)")
	}
	r := testproc.StartRedis(t, testproc.RedisConfig{})
	client := redis.NewClient(&redis.Options{Addr: r.Addr()})
	t.Cleanup(func() { client.Close() })
	return r, client
}

// windowModel is the exact sliding window in arrival order, as
// internal/ratelimit keeps it: a turn goes at the earliest of now, the
// pause, a window after the limit-th latest turn, and the latest turn.
type windowModel struct {
	limit, window int64
	turns         []int64
	pause         int64
}

func (m *windowModel) next(now int64) int64 {
	slot := max(now, m.pause)
	if n := len(m.turns); n > 0 {
		slot = max(slot, m.turns[n-1])
		if n >= int(m.limit) {
			slot = max(slot, m.turns[n-int(m.limit)]+m.window)
		}
	}
	return slot
}

// The turn script answers exactly what the window promises, turn for turn,
// as the first script did (the two cannot share a log: a list, a string): a random
// sequence of turns (some refused for their max wait), pauses and idle
// moments, over two tenants, checked against the model.
func TestTurnScriptKeepsTheExactWindow(t *testing.T) {
	_, client := startLimiterRedis(t)
	ctx := context.Background()
	const limit, window = 3, 150
	for _, mix := range []struct {
		name    string
		scripts []*redis.Script
	}{
		{"first script", []*redis.Script{firstTurnScript}},
		{"turn script", []*redis.Script{turnScript}},
	} {
		t.Run(mix.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, uint64(len(mix.scripts))))
			models := map[string]*windowModel{}
			granted, refused := 0, 0
			for i := range 400 {
				tenant := "t" + strconv.Itoa(rng.IntN(2))
				base := TurnsKey("model-"+mix.name, tenant)
				keys := []string{base, base + ":pause", base + ":generation"}
				m := models[tenant]
				if m == nil {
					m = &windowModel{limit: limit, window: window}
					models[tenant] = m
				}
				switch r := rng.IntN(20); {
				case r == 0: // a 429: pause the tenant
					d := int64(rng.IntN(200))
					if err := pauseScript.Run(ctx, client, keys[1:2], d, d+1000).Err(); err != nil {
						t.Fatal(err)
					}
					p, err := client.Get(ctx, keys[1]).Int64()
					if err != nil {
						t.Fatalf("the pause: %v", err)
					}
					if p < m.pause {
						t.Fatalf("the pause moved earlier: %d after %d", p, m.pause)
					}
					m.pause = p
					continue
				case r <= 4:
					time.Sleep(time.Duration(rng.IntN(100)) * time.Millisecond)
				case r == 5:
					gen := rng.Int64N(1000)
					client.Set(ctx, keys[2], gen, time.Minute)
				}
				maxWait := int64(rng.IntN(800))
				s := mix.scripts[i%len(mix.scripts)]
				lo := redisMillis(t, client)
				res, err := s.Run(ctx, client, keys, window, limit, maxWait).Int64Slice()
				if err != nil {
					t.Fatal(err)
				}
				hi := redisMillis(t, client)
				slot, wait := res[0], res[1]
				if slot < 0 {
					// Refused: the wait the model gives at some moment
					// during the call is over maxWait.
					refused++
					if wait <= maxWait {
						t.Fatalf("call %d refused with wait %d <= max wait %d", i, wait, maxWait)
					}
					if x := m.next(0); wait < x-hi || wait > x-lo {
						t.Fatalf("call %d refused with wait %d, want %d to %d", i, wait, x-hi, x-lo)
					}
					continue
				}
				now := slot - wait
				if now < lo || now > hi {
					t.Fatalf("call %d: now %d is not Redis's clock (%d to %d)", i, now, lo, hi)
				}
				if want := m.next(now); slot != want {
					t.Fatalf("call %d (%s, now %d): slot %d, want %d (turns %v, pause %d)", i, tenant, now, slot, want, m.turns, m.pause)
				}
				if wait > maxWait {
					t.Fatalf("call %d granted a wait of %d over max wait %d", i, wait, maxWait)
				}
				granted++
				m.turns = append(m.turns, slot)
				if s == turnScript {
					want, _ := client.Get(ctx, keys[2]).Int64()
					if len(res) != 3 || res[2] != want {
						t.Fatalf("call %d: answer %v, want the generation %d third", i, res, want)
					}
				}
				// The log outlives each turn by a window (and a second).
				ttl, err := client.PTTL(ctx, keys[0]).Result()
				if err != nil || ttl < time.Duration(slot+window-now)*time.Millisecond {
					t.Fatalf("call %d: the log expires in %v, before its turn at +%dms leaves the window (%v)", i, ttl, slot-now, err)
				}
				if s == turnScript {
					if n, _ := client.StrLen(ctx, keys[0]).Result(); n != 13*int64(min(len(m.turns), limit)) {
						t.Fatalf("call %d: the log holds %d characters, want the last %d times' 13 each", i, n, limit)
					}
				} else if n, _ := client.LLen(ctx, keys[0]).Result(); n > 2*limit {
					t.Fatalf("call %d: the log holds %d times", i, n)
				}
			}
			t.Logf("%d granted, %d refused", granted, refused)
			if granted < 150 || refused < 10 {
				t.Fatalf("%d granted, %d refused: the sequence did not exercise both", granted, refused)
			}
		})
	}
}

// redisMillis is Redis's clock in milliseconds, as the scripts read it.
func redisMillis(t *testing.T, client *redis.Client) int64 {
	now, err := client.Time(context.Background()).Result()
	if err != nil {
		t.Fatal(err)
	}
	return now.UnixMilli()
}

// limiterOwner is the little of an owner the limiter needs.
type limiterOwner struct{ clk *clock.Clock }

func (o limiterOwner) ClientID() string        { return "limiter-test" }
func (o limiterOwner) Clock() *clock.Clock     { return o.clk }
func (o limiterOwner) Logger() *zap.Logger     { return zap.NewNop() }
func (o limiterOwner) Codec() *tokens.Records  { return &tokens.Records{ClientID: "limiter-test"} }
func (o limiterOwner) ApplyEvent(tokens.Event) {}
func (o limiterOwner) Resync()                 {}
func (o limiterOwner) RevalidateTenant(string) {}

func newTestLimiter(t *testing.T, addr string, limit int, window time.Duration) *Limiter {
	t.Helper()
	opts, err := ParseRedisURL("redis://" + addr + "/0")
	if err != nil {
		t.Fatal(err)
	}
	c := New(t.Name(), limiterOwner{clk: clock.New()}, opts, "redis://"+addr+"/0", zap.NewNop(), func() {})
	t.Cleanup(func() { _ = c.Destruct() })
	return NewLimiter(c, limit, window, ratelimit.New(limit, window, nil))
}

// The promises of internal/ratelimit's tests, kept by the Redis limiter
// (3 per 500 ms): the 4th request waits until the 1st leaves the window;
// waiters go in arrival order, each a window after the turn it follows;
// a wait past max_wait is refused at once with the wait it would have
// been; a pause delays everyone; and with Redis gone, the in-process
// limiter keeps the budget.
func TestRedisLimiterKeepsTheWindowsPromises(t *testing.T) {
	r, _ := startLimiterRedis(t)
	const window = 500 * time.Millisecond
	l := newTestLimiter(t, r.Addr(), 3, window)
	ctx := context.Background()
	const slack = 15 * time.Millisecond // timers, and Redis's clock in ms

	var firsts [3]time.Time
	for i := range firsts {
		if waited, err := l.Wait(ctx, "a", time.Second); err != nil || waited != 0 {
			t.Fatalf("request %d waited %v, %v: want at once", i+1, waited, err)
		}
		firsts[i] = time.Now()
		time.Sleep(30 * time.Millisecond)
	}
	// Three waiters, in arrival order, each a window after one of the first three.
	var mu sync.Mutex
	var order []int
	admitted := make([]time.Time, 3)
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := l.Wait(ctx, "a", 2*time.Second); err != nil {
				t.Errorf("waiter %d: %v", i, err)
			}
			mu.Lock()
			order = append(order, i)
			admitted[i] = time.Now()
			mu.Unlock()
		}()
		time.Sleep(10 * time.Millisecond) // arrival order
	}
	// A 7th that would wait past its max wait is refused at once.
	before := time.Now()
	_, err := l.Wait(ctx, "a", 300*time.Millisecond)
	var rl *ratelimit.Error
	if !errors.As(err, &rl) || !errors.Is(err, ratelimit.ErrRateLimited) {
		t.Fatalf("7th request: %v, want a *ratelimit.Error", err)
	}
	if took := time.Since(before); took > 100*time.Millisecond {
		t.Errorf("the refusal took %v", took)
	}
	// Its turn would have been a window after the 4th's (at about firsts[0]+window).
	if want := firsts[0].Add(2 * window).Sub(before); rl.RetryAfter < want-60*time.Millisecond || rl.RetryAfter > want+slack {
		t.Errorf("RetryAfter %v, want about %v", rl.RetryAfter, want)
	}
	wg.Wait()
	if order[0] != 0 || order[1] != 1 || order[2] != 2 {
		t.Errorf("waiters admitted in order %v, want arrival order", order)
	}
	for i := range 3 {
		if early := firsts[i].Add(window).Sub(admitted[i]); early > slack {
			t.Errorf("waiter %d admitted %v before request %d left the window", i, early, i+1)
		}
		if late := admitted[i].Sub(firsts[i].Add(window)); late > 150*time.Millisecond {
			t.Errorf("waiter %d admitted %v after request %d left the window", i, late, i+1)
		}
	}

	// A pause (Fortnox's 429) delays everyone, on a tenant with budget to spare.
	l.Penalize("b", 300*time.Millisecond)
	before = time.Now()
	if waited, err := l.Wait(ctx, "b", time.Second); err != nil || waited < 300*time.Millisecond-slack {
		t.Errorf("after a 300ms pause the request waited %v, %v", waited, err)
	}
	if _, err := l.Wait(ctx, "b", 100*time.Millisecond); err != nil {
		t.Errorf("after the pause: %v", err)
	}
	if took := time.Since(before); took > 300*time.Millisecond+150*time.Millisecond {
		t.Errorf("two requests after a 300ms pause took %v", took)
	}

	// Redis gone: the in-process limiter takes over, with the same window
	// (the calls that find out whether Redis is back take their time too).
	r.Kill()
	var served []time.Time
	for i := range 6 {
		if _, err := l.Wait(ctx, "c", 2*time.Second); err != nil {
			t.Fatalf("Redis down, request %d: %v", i+1, err)
		}
		served = append(served, time.Now())
	}
	for i := 3; i < len(served); i++ {
		if d := served[i].Sub(served[i-3]); d < window-slack {
			t.Errorf("Redis down: requests %d and %d %v apart, within one window", i-2, i+1, d)
		}
	}
}

// On a Redis Cluster the turn script's keys (the log, the pause, the
// generation) share the tenant's slot: turns are counted, a pause holds,
// and no call fails with CROSSSLOT (which would count as an outage and
// fall back to the share).
func TestRedisLimiterOnACluster(t *testing.T) {
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s is not on PATH: install it (apt-get install redis-server; CI does)", bin)
		}
	}
	cl := testproc.StartCluster(t, testproc.RedisConfig{})
	opts, err := ClusterOptions(ClusterConfig{Addrs: cl.Addrs()})
	if err != nil {
		t.Fatal(err)
	}
	c := NewCluster(t.Name(), limiterOwner{clk: clock.New()}, opts, "cluster", zap.NewNop(), func() {})
	t.Cleanup(func() { _ = c.Destruct() })
	const window = 2 * time.Second
	l := NewLimiter(c, 3, window, ratelimit.New(3, window, nil))
	// Trusted alone from the start, so that the script's count is what is
	// checked (not the share's).
	c.upSince.Store(time.Now().Add(-time.Minute).UnixNano())
	for _, tenant := range []string{"1234567", "7654321", "1111111"} {
		if n := admitted(t, l, tenant, 5); n != 3 {
			t.Errorf("tenant %s: %d of 5 turns admitted at once, want 3", tenant, n)
		}
	}
	l.Penalize("2222222", time.Second)
	if n := admitted(t, l, "2222222", 1); n != 0 {
		t.Error("a turn was admitted during the pause")
	}
	if c.Down() {
		t.Error("a limiter call failed on the cluster (CROSSSLOT?): the connection counts Redis as down")
	}
}

// A Redis that hangs (SIGSTOP) costs each request nothing once the outage
// is known: the call that met it waited for its bound, every later one
// fails at once (none waits to find out whether Redis is back: a probe in
// the background does), and Redis's return is noticed without a request.
func TestHungRedisCostsRequestsNothing(t *testing.T) {
	r, _ := startLimiterRedis(t)
	l := newTestLimiter(t, r.Addr(), 1000, time.Second)
	c := l.c
	ctx := context.Background()
	get := func() error {
		return c.call(ctx, "get", func(ctx context.Context) error { return c.client.Get(ctx, "k").Err() })
	}
	if err := get(); err != nil && !errors.Is(err, redis.Nil) {
		t.Fatal(err)
	}
	thaw := r.Freeze(t)
	if err := get(); !errors.Is(err, tokens.ErrSharedUnavailable) || !c.Down() {
		t.Fatalf("a call to a hung Redis: %v, down %v; want an outage", err, c.Down())
	}
	var slowest time.Duration
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		start := time.Now()
		if err := get(); !errors.Is(err, tokens.ErrSharedUnavailable) {
			t.Fatalf("during the outage: %v", err)
		}
		slowest = max(slowest, time.Since(start))
	}
	if slowest > 100*time.Millisecond {
		t.Errorf("with the outage known, a call took %v: a request waited on a hung Redis", slowest)
	}
	thaw()
	waitFor(t, "the outage's end noticed with no request", func() bool { return !c.Down() })
	if err := get(); err != nil && !errors.Is(err, redis.Nil) {
		t.Errorf("after the outage: %v", err)
	}
}

// go-redis's own lines (a dial that failed) reach the plugin's logger at
// debug level, not stderr as plain text between Caddy's JSON logs.
func TestGoRedisLinesGoToTheLogger(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	addr := testproc.Addr(testproc.FreePort(t)) // nothing listens there
	opts, err := ParseRedisURL("redis://" + addr + "/0")
	if err != nil {
		t.Fatal(err)
	}
	c := New(t.Name(), limiterOwner{clk: clock.New()}, opts, "redis://"+addr+"/0", zap.New(core), func() {})
	t.Cleanup(func() { _ = c.Destruct() })
	err = c.call(context.Background(), "get", func(ctx context.Context) error { return c.client.Get(ctx, "k").Err() })
	if !errors.Is(err, tokens.ErrSharedUnavailable) {
		t.Fatalf("a call to nothing: %v", err)
	}
	waitFor(t, "go-redis's line about the dial", func() bool {
		return logs.FilterLoggerName("go-redis").FilterMessageSnippet("failed to dial").Len() > 0
	})
	for _, e := range logs.FilterLoggerName("go-redis").All() {
		if e.Level != zap.DebugLevel {
			t.Errorf("go-redis's line %q logged at %v, want debug", e.Message, e.Level)
		}
	}
}

// The turn log reaches the replicas (not the append-only file), so a
// failover keeps the window: the replica the Sentinels promote holds the
// turns taken on the primary before it died.
func TestTurnLogSurvivesAFailover(t *testing.T) {
	s := testproc.StartSentinel(t, testproc.SentinelConfig{})
	opts, err := FailoverOptions(SentinelConfig{Master: s.MasterName(), Addrs: s.SentinelAddrs()})
	if err != nil {
		t.Fatal(err)
	}
	c := NewSentinel(t.Name(), limiterOwner{clk: clock.New()}, opts, "sentinel", zap.NewNop(), func() {})
	t.Cleanup(func() { _ = c.Destruct() })
	l := NewLimiter(c, 3, 10*time.Second, ratelimit.New(3, 10*time.Second, nil))
	for i := range 3 {
		if waited, err := l.Wait(context.Background(), "a", 0); err != nil || waited != 0 {
			t.Fatalf("turn %d: waited %v, %v", i+1, waited, err)
		}
	}
	ctx := context.Background()
	primary, err := s.Primary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pc := redis.NewClient(&redis.Options{Addr: primary})
	defer pc.Close()
	if n, err := pc.Wait(ctx, 1, 5*time.Second).Result(); err != nil || n < 1 {
		t.Fatalf("WAIT 1: %d replicas, %v", n, err)
	}
	old := s.KillPrimary(t)
	nc := redis.NewClient(&redis.Options{Addr: s.WaitNewPrimary(t, old, 30*time.Second)})
	defer nc.Close()
	log, err := nc.Get(ctx, TurnsKey("limiter-test", "a")).Result()
	if err != nil || len(log) != 3*13 {
		t.Fatalf("the promoted replica holds %q (%v), want the three turns taken on the primary", log, err)
	}
}
