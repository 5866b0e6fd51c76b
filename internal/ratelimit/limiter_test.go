package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
)

// clk is the limiters' clock in these tests, moved to skip idle windows.
var clk = clock.New()

func newRateLimiter(limit int, window time.Duration) *Limiter {
	return New(limit, window, clk)
}

func TestRateLimiterNeverAdmitsMoreThanLimitPerWindow(t *testing.T) {
	const limit, requests = 5, 23
	const window = 300 * time.Millisecond
	l := newRateLimiter(limit, window)

	admitted := make([]time.Time, requests)
	var wg sync.WaitGroup
	for i := range requests {
		wg.Go(func() {
			if _, err := l.Wait(context.Background(), "tenant", time.Minute); err != nil {
				t.Error(err)
			}
			admitted[i] = clk.Now()
		})
	}
	wg.Wait()

	slices.SortFunc(admitted, time.Time.Compare)
	// A goroutine runs a little after its slot (much later on a loaded
	// 2-core machine with the race detector, while other test packages
	// run); allow for that lateness, which is still far less than the
	// window an extra admission would steal.
	const lateness = 100 * time.Millisecond
	for i := limit; i < requests; i++ {
		if gap := admitted[i].Sub(admitted[i-limit]); gap < window-lateness {
			t.Errorf("admissions %d and %d are %v apart; want at least %v", i-limit, i, gap, window)
		}
	}
	// Waiting their turn must not cost more than the limit demands:
	// 23 requests at 5 per window go in 5 batches, 4 windows apart.
	ideal := (requests - 1) / limit * window
	if took := admitted[requests-1].Sub(admitted[0]); took > ideal+window/2 {
		t.Errorf("the burst took %v; want about %v", took, ideal)
	}
}

func TestRateLimiterAdmitsInArrivalOrder(t *testing.T) {
	l := newRateLimiter(1, 20*time.Millisecond)
	var mu sync.Mutex
	var order []int
	var wg sync.WaitGroup
	for i := range 8 {
		before := newestSlot(l, "tenant")
		wg.Go(func() {
			if _, err := l.Wait(context.Background(), "tenant", time.Minute); err != nil {
				t.Error(err)
			}
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
		})
		// Let request i take its place in the queue before i+1 arrives.
		waitUntil(t, func() bool { return newestSlot(l, "tenant").After(before) })
	}
	wg.Wait()
	if want := []int{0, 1, 2, 3, 4, 5, 6, 7}; !slices.Equal(order, want) {
		t.Errorf("admitted in order %v; want %v", order, want)
	}
}

func TestRateLimiterRejectsAtOnceAWaitLongerThanMaxWait(t *testing.T) {
	l := newRateLimiter(2, time.Second)
	mustAdmitNow(t, l, "tenant")
	clk.Advance(300 * time.Millisecond)
	mustAdmitNow(t, l, "tenant")

	// The first admission leaves the window in 700ms.
	started := time.Now()
	_, err := l.Wait(context.Background(), "tenant", 400*time.Millisecond)
	assertPromptly(t, started)
	retryAfter := rateLimitedFor(t, err)
	if retryAfter <= 600*time.Millisecond || retryAfter > 700*time.Millisecond {
		t.Errorf("RetryAfter = %v; want just under 700ms", retryAfter)
	}
	if !strings.Contains(err.Error(), "ms away") {
		t.Errorf("error %q does not say how long the wait would be", err)
	}

	// The rejected request took no slot: the next one is still 700ms away,
	// not a window after the second admission.
	_, err = l.Wait(context.Background(), "tenant", 0)
	if retryAfter := rateLimitedFor(t, err); retryAfter > 700*time.Millisecond {
		t.Errorf("after a rejection the next slot is %v away; want under 700ms", retryAfter)
	}
}

func TestRateLimiterRejectsAtOnceAWaitPastTheDeadline(t *testing.T) {
	l := newRateLimiter(1, time.Second)
	mustAdmitNow(t, l, "tenant")
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()

	started := time.Now()
	_, err := l.Wait(ctx, "tenant", time.Minute)
	assertPromptly(t, started)
	if retryAfter := rateLimitedFor(t, err); retryAfter < 900*time.Millisecond {
		t.Errorf("RetryAfter = %v; want about 1s", retryAfter)
	}
}

func TestRateLimiterReturnsPromptlyWhenCancelled(t *testing.T) {
	l := newRateLimiter(1, 10*time.Second)
	mustAdmitNow(t, l, "tenant")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := l.Wait(ctx, "tenant", time.Minute)
		done <- err
	}()
	waitUntil(t, func() bool { return waiting(l, "tenant") == 1 })

	cancel()
	cancelled := time.Now()
	select {
	case err := <-done:
		assertPromptly(t, cancelled)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v; want context.Canceled", err)
		}
	case <-time.After(time.Second):
		t.Fatal("wait did not return after its context was cancelled")
	}

	// The cancelled request's slot stays reserved (see wait), so the next
	// request queues a window behind it.
	_, err := l.Wait(context.Background(), "tenant", 0)
	if retryAfter := rateLimitedFor(t, err); retryAfter < 19*time.Second {
		t.Errorf("next slot is %v away; want about 20s", retryAfter)
	}
}

func TestRateLimiterTakesNoSlotForAnAlreadyCancelledContext(t *testing.T) {
	l := newRateLimiter(1, time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Wait(ctx, "tenant", time.Minute); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v; want context.Canceled", err)
	}
	mustAdmitNow(t, l, "tenant")
}

func TestRateLimiterKeepsKeysIndependent(t *testing.T) {
	const window = time.Second
	l := newRateLimiter(2, window)
	mustAdmitNow(t, l, "busy")
	mustAdmitNow(t, l, "busy")
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			if _, err := l.Wait(context.Background(), "busy", time.Minute); err != nil {
				t.Error(err)
			}
		})
	}
	defer wg.Wait()
	waitUntil(t, func() bool { return waiting(l, "busy") == 2 })

	started := time.Now()
	mustAdmitNow(t, l, "quiet")
	assertPromptly(t, started)

	// Sleepers hold no lock: their own key still answers at once.
	started = time.Now()
	_, err := l.Wait(context.Background(), "busy", 0)
	assertPromptly(t, started)
	rateLimitedFor(t, err)
}

// mustAdmitNow fails the test unless a request for key goes without waiting.
func mustAdmitNow(t *testing.T, l *Limiter, key string) {
	t.Helper()
	waited, err := l.Wait(context.Background(), key, 0)
	if err != nil || waited != 0 {
		t.Fatalf("wait(%q) = %v, %v; want it admitted at once", key, waited, err)
	}
}

// rateLimitedFor fails the test unless err is a rate-limit rejection, and
// returns its RetryAfter.
func rateLimitedFor(t *testing.T, err error) time.Duration {
	t.Helper()
	var rl *Error
	if !errors.As(err, &rl) || !errors.Is(err, ErrRateLimited) {
		t.Fatalf("err = %v; want a *Error", err)
	}
	return rl.RetryAfter
}

// assertPromptly fails the test if more than a scheduling hiccup has passed
// since started. The hiccup allowed is generous (the suite runs with the
// race detector beside other test packages on 2 cores); the waits it is
// told apart from are longer still.
func assertPromptly(t *testing.T, started time.Time) {
	t.Helper()
	if took := time.Since(started); took > 250*time.Millisecond {
		t.Errorf("took %v; want an immediate answer", took)
	}
}

// newestSlot is the latest time reserved for key.
func newestSlot(l *Limiter, key string) time.Time {
	k := l.lockedState(key)
	defer k.mu.Unlock()
	return k.newest()
}

// waitUntil polls cond until it holds, failing the test after a second.
func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within a second")
		}
		time.Sleep(100 * time.Microsecond)
	}
}

func TestRateLimiterPenalizeDelaysTheNextAdmission(t *testing.T) {
	const pause = 150 * time.Millisecond
	l := newRateLimiter(10, time.Second)
	mustAdmitNow(t, l, "tenant")
	l.Penalize("tenant", pause)
	assertWaitsAbout(t, l, "tenant", pause)
}

func TestRateLimiterPenalizeRepeatedForOne429StormDoesNotAddUp(t *testing.T) {
	const pause = 100 * time.Millisecond
	l := newRateLimiter(1, 50*time.Millisecond)
	mustAdmitNow(t, l, "tenant")
	var wg sync.WaitGroup
	wg.Go(func() { assertWaitsAbout(t, l, "tenant", pause) })
	waitUntil(t, func() bool { return waiting(l, "tenant") == 1 })
	// Every request that got the 429 reports it.
	for range 5 {
		l.Penalize("tenant", pause)
	}
	wg.Wait()
}

func TestRateLimiterPenalizeMovesRequestsAlreadyWaiting(t *testing.T) {
	const window, pause = 100 * time.Millisecond, 250 * time.Millisecond
	l := newRateLimiter(1, window)
	mustAdmitNow(t, l, "tenant")
	var wg sync.WaitGroup
	wg.Go(func() { assertWaitsAbout(t, l, "tenant", pause) })
	waitUntil(t, func() bool { return waiting(l, "tenant") == 1 })

	l.Penalize("tenant", pause)
	// The next arrival still keeps a window from the moved request.
	_, err := l.Wait(context.Background(), "tenant", 0)
	if retryAfter := rateLimitedFor(t, err); retryAfter < pause+window-20*time.Millisecond {
		t.Errorf("next slot is %v away; want about %v", retryAfter, pause+window)
	}
	wg.Wait()
}

// assertWaitsAbout fails the test unless a request for key waits about d:
// not less, and not much more than a busy scheduler adds.
func assertWaitsAbout(t *testing.T, l *Limiter, key string, d time.Duration) {
	t.Helper()
	waited, err := l.Wait(context.Background(), key, time.Minute)
	if err != nil {
		t.Error(err)
		return
	}
	if waited < d-10*time.Millisecond || waited > d+150*time.Millisecond {
		t.Errorf("waited %v; want about %v", waited, d)
	}
}

// waiting is the number of requests for key that sleep until their slot.
func waiting(l *Limiter, key string) int {
	k := l.lockedState(key)
	defer k.mu.Unlock()
	return len(k.waiting)
}

func TestRateLimiterSweepForgetsIdleKeysAndKeepsActiveOnes(t *testing.T) {
	const window = 100 * time.Millisecond
	l := newRateLimiter(2, window)
	mustAdmitNow(t, l, "idle")
	mustAdmitNow(t, l, "idle")
	mustAdmitNow(t, l, "active")
	l.Penalize("penalized", 10*window)

	clk.Advance(window + time.Millisecond)
	mustAdmitNow(t, l, "active")
	l.sweep()
	assertTracked(t, l, "active", "penalized")

	// A forgotten key starts afresh: a full window's worth goes at once.
	mustAdmitNow(t, l, "idle")
	mustAdmitNow(t, l, "idle")

	clk.Advance(10 * window)
	l.sweep()
	assertTracked(t, l)
}

func TestRateLimiterSweepKeepsKeysWithRequestsWaiting(t *testing.T) {
	const window = 50 * time.Millisecond
	l := newRateLimiter(1, window)
	mustAdmitNow(t, l, "tenant")
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := l.Wait(context.Background(), "tenant", time.Minute); err != nil {
			t.Error(err)
		}
	})
	waitUntil(t, func() bool { return waiting(l, "tenant") == 1 })

	// The sleeper's slot is in the past now, but it has not gone yet.
	clk.Advance(2 * window)
	l.sweep()
	assertTracked(t, l, "tenant")
	wg.Wait()
}

func TestRateLimiterRunSweepsUntilCancelled(t *testing.T) {
	const window = 10 * time.Millisecond
	l := newRateLimiter(1, window)
	mustAdmitNow(t, l, "tenant")
	clk.Advance(2 * window)

	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() {
		l.Run(ctx)
		close(stopped)
	}()
	waitUntil(t, func() bool { return l.keys() == 0 })
	cancel()
	select {
	case <-stopped:
	case <-time.After(time.Second):
		t.Fatal("run did not return after its context was cancelled")
	}
}

// assertTracked fails the test unless l tracks exactly the keys given.
func assertTracked(t *testing.T, l *Limiter, keys ...string) {
	t.Helper()
	var tracked []string
	l.states.Range(func(key, _ any) bool {
		tracked = append(tracked, key.(string))
		return true
	})
	slices.Sort(tracked)
	if !slices.Equal(tracked, keys) || l.keys() != len(keys) {
		t.Errorf("tracking %v (keys() = %d); want %v", tracked, l.keys(), keys)
	}
}

// The hot path: a tenant under its limit. A window of a microsecond keeps
// the loop under the limit while the ring is full, which is how a busy
// tenant's requests find it. maxWait 0 makes any wait fail the benchmark.
func BenchmarkRateLimiterUnderLimit(b *testing.B) {
	l := newRateLimiter(25, time.Microsecond)
	ctx, cancel := context.WithCancel(context.Background()) // as a request's context is
	defer cancel()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := l.Wait(ctx, "tenant", 0); err != nil {
			b.Fatal(err)
		}
	}
}

// The hot path across many tenants at once.
func BenchmarkRateLimiterUnderLimitParallel(b *testing.B) {
	l := newRateLimiter(25, time.Microsecond)
	tenants := make([]string, 1000)
	for i := range tenants {
		tenants[i] = fmt.Sprint("tenant-", i)
	}
	var next atomic.Int64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		i := int(next.Add(97))
		for pb.Next() {
			if _, err := l.Wait(ctx, tenants[i%len(tenants)], 0); err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
}

// WaitAtMost keeps the same window with a smaller limit: of 25 per window,
// a share of 8 admits 8 at once, refuses the 9th with the wait until the
// 1st leaves the window, and admits 8 more once it moved on; the turns
// count for Wait too (the full limit sees 8 + 8 in the ring), and a larger
// share later counts the turns already taken.
func TestRateLimiterWaitAtMostKeepsItsShareOfTheWindow(t *testing.T) {
	const window = 5 * time.Second
	l := newRateLimiter(25, window)
	ctx := context.Background()
	admit := func(n, share int) {
		t.Helper()
		for i := range n {
			if waited, err := l.WaitAtMost(ctx, "tenant", 0, share); err != nil || waited != 0 {
				t.Fatalf("turn %d of a share of %d: %v, %v; want it at once", i+1, share, waited, err)
			}
		}
	}
	admit(8, 8)
	_, err := l.WaitAtMost(ctx, "tenant", 0, 8)
	if ra := rateLimitedFor(t, err); ra <= window-time.Second || ra > window {
		t.Fatalf("the 9th of a share of 8 would wait %v, want just under %v", ra, window)
	}
	clk.Advance(window)
	admit(8, 8)
	if _, err := l.WaitAtMost(ctx, "tenant", 0, 8); err == nil {
		t.Fatal("a 9th in the second window was admitted")
	}
	// The share grows to 12 (fewer sidecars): 4 more in this window.
	admit(4, 12)
	if _, err := l.WaitAtMost(ctx, "tenant", 0, 12); err == nil {
		t.Fatal("a 13th with a share of 12 was admitted")
	}
	// The full limit counts the 12 of this window: 13 more.
	admit(13, 25)
	if _, err := l.Wait(ctx, "tenant", 0); err == nil {
		t.Fatal("a 26th in one window was admitted")
	}
	// Out of range: 0 is 1, more than the limit is the limit.
	l2 := newRateLimiter(3, window)
	if _, err := l2.WaitAtMost(ctx, "x", 0, 0); err != nil {
		t.Fatalf("a share of 0 admits one: %v", err)
	}
	if _, err := l2.WaitAtMost(ctx, "x", 0, 0); err == nil {
		t.Fatal("a share of 0 admitted two")
	}
	for range 2 {
		if _, err := l2.WaitAtMost(ctx, "x", 0, 99); err != nil {
			t.Fatalf("a share of 99 on a limit of 3: %v", err)
		}
	}
	if _, err := l2.WaitAtMost(ctx, "x", 0, 99); err == nil {
		t.Fatal("a share of 99 admitted past the limit of 3")
	}
}
