// Package ratelimit paces requests per key (a client id and tenant) with
// a sliding window, in arrival order: Fortnox allows so many requests per
// window and answers 429 beyond it. Limiter is the in-process schedule;
// Waiter is what the caller needs, which a shared (Redis) budget
// implements too.
package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
)

// Waiter is a key's rate budget: the in-process Limiter, or a budget
// shared by several processes.
type Waiter interface {
	// Wait blocks until the request for key may go, in arrival order; a
	// wait longer than maxWait (or ctx's deadline) is refused at once with
	// an *Error.
	Wait(ctx context.Context, key string, maxWait time.Duration) (time.Duration, error)
	// Penalize admits nothing for key before now+d (after Fortnox's 429).
	Penalize(key string, d time.Duration)
}

var _ Waiter = (*Limiter)(nil)

// Limiter admits at most limit requests per window for each key, in
// arrival order.
//
// Fortnox counts requests per (client_id, tenant) over a sliding window and
// answers 429 beyond it. Queueing here lets the app's requests wait their turn
// instead of failing. Each arrival reserves, under its key's mutex, the
// earliest time the window allows, then sleeps until then holding no lock.
// Times are handed out in the order the mutex is taken, so admission is FIFO
// per key and a burst drains at exactly the allowed rate.
type Limiter struct {
	limit  int
	window time.Duration
	clock  *clock.Clock // nil: real time
	states sync.Map     // key (string) → *keyState
	// tracked counts states, which sync.Map cannot do cheaply.
	tracked atomic.Int64
}

// keyState is one key's schedule of admissions.
type keyState struct {
	mu sync.Mutex
	// slots is a ring of the last len(slots) reserved admission times, in
	// the order they were reserved (which is also time order). Once the ring
	// is full, slots[next] is the oldest: the one the next arrival must be a
	// window apart from.
	slots []time.Time
	next  int
	full  bool
	// pausedUntil admits nothing before it (see Penalize).
	pausedUntil time.Time
	// waiting holds the reservations whose requests still sleep, earliest
	// first, so that Penalize can move them.
	waiting []*reservation
	// forgotten is set when sweep drops the state from the map. A caller
	// that looked it up just before must look again, or its reservation
	// would go to a schedule no one else sees.
	forgotten bool
}

// reservation is the admission time of one sleeping request.
type reservation struct{ slot time.Time }

// ErrRateLimited is what every rejection by the limiter is (errors.Is);
// the *Error wrapping it says how long the wait would have been.
var ErrRateLimited = errors.New("rate limited")

// Error rejects a request that would have had to wait too long.
type Error struct {
	// RetryAfter is the wait the request would have needed. Rounding it up
	// to whole seconds for a Retry-After header is the caller's job.
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	return fmt.Sprintf("%v: the next free slot is %v away", ErrRateLimited, e.RetryAfter.Round(time.Millisecond))
}

func (e *Error) Unwrap() error { return ErrRateLimited }

// New returns a limiter admitting limit requests per window per key, on
// clk (nil: real time). The caller validates its configuration; nonsense
// here is a bug.
func New(limit int, window time.Duration, clk *clock.Clock) *Limiter {
	if limit < 1 || window <= 0 {
		panic(fmt.Sprintf("fortnox: rate limit of %d per %v", limit, window))
	}
	return &Limiter{limit: limit, window: window, clock: clk}
}

// Wait blocks until the request for key may go, in arrival order, and
// returns how long it waited.
//
// A request whose wait would exceed maxWait, or end after ctx's deadline, is
// rejected at once with a *Error and takes no slot: it would give
// up before its turn, and its slot would only delay the requests behind it.
//
// If ctx is cancelled while waiting, Wait returns ctx.Err() promptly and the
// reserved slot is left unused rather than given back: the requests behind
// it already sleep until times computed with it counted, so handing it to a
// newcomer would let the newcomer jump the queue, and keeping it costs at
// most one of limit slots for one window.
func (l *Limiter) Wait(ctx context.Context, key string, maxWait time.Duration) (time.Duration, error) {
	return l.WaitAtMost(ctx, key, maxWait, l.limit)
}

// WaitAtMost is Wait admitting at most n requests per window for key
// (n is clamped to 1..limit), in the same arrival order and on the same
// schedule as Wait: the turns it admits count for Wait and the other way
// round. A cluster's sidecar uses it to keep to its share of a budget
// while the budget's store cannot be reached; n may change from call to
// call (a smaller n takes effect at once, with the turns already
// reserved counted against it).
func (l *Limiter) WaitAtMost(ctx context.Context, key string, maxWait time.Duration, n int) (time.Duration, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	n = max(1, min(n, l.limit))
	k := l.lockedState(key)
	start := l.clock.Now()
	need := k.earliestSlot(start, l.window, n).Sub(start)
	if need <= 0 {
		k.reserve(start)
		k.mu.Unlock()
		return 0, nil
	}
	if err := rejectLongWait(ctx, need, maxWait); err != nil {
		k.mu.Unlock()
		return 0, err
	}
	r := &reservation{slot: start.Add(need)}
	k.reserve(r.slot)
	k.waiting = append(k.waiting, r)
	k.mu.Unlock()
	return k.sleep(ctx, l.clock, r, start, need)
}

// lockedState returns key's schedule with its mutex held.
func (l *Limiter) lockedState(key string) *keyState {
	for {
		k := l.state(key)
		k.mu.Lock()
		if !k.forgotten {
			return k
		}
		k.mu.Unlock()
	}
}

// state returns key's schedule, creating it on first use.
func (l *Limiter) state(key string) *keyState {
	if v, ok := l.states.Load(key); ok {
		return v.(*keyState)
	}
	v, loaded := l.states.LoadOrStore(key, &keyState{slots: make([]time.Time, l.limit)})
	if !loaded {
		l.tracked.Add(1)
	}
	return v.(*keyState)
}

// rejectLongWait refuses a wait longer than maxWait or past ctx's deadline.
func rejectLongWait(ctx context.Context, need, maxWait time.Duration) error {
	if need > maxWait {
		return &Error{RetryAfter: need}
	}
	if deadline, ok := ctx.Deadline(); ok && need > time.Until(deadline) {
		return &Error{RetryAfter: need}
	}
	return nil
}

// sleep waits d, and longer if penalize moves r's slot meanwhile, unless ctx
// ends first. It returns how long the request waited since start.
func (k *keyState) sleep(ctx context.Context, clk *clock.Clock, r *reservation, start time.Time, d time.Duration) (time.Duration, error) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			k.leave(r)
			return clk.Now().Sub(start), ctx.Err()
		case <-timer.C:
		}
		if d = k.leaveIfDue(clk, r); d <= 0 {
			return clk.Now().Sub(start), nil
		}
		timer.Reset(d)
	}
}

// leaveIfDue takes r off the waiting list if its slot has come, and
// otherwise returns how long it still has to wait.
func (k *keyState) leaveIfDue(clk *clock.Clock, r *reservation) time.Duration {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := r.slot.Sub(clk.Now())
	if d <= 0 {
		k.removeWaiting(r)
	}
	return d
}

// leave takes r off the waiting list; its slot stays reserved (see Wait).
func (k *keyState) leave(r *reservation) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.removeWaiting(r)
}

func (k *keyState) removeWaiting(r *reservation) {
	if i := slices.Index(k.waiting, r); i >= 0 {
		k.waiting = slices.Delete(k.waiting, i, i+1)
	}
}

// Penalize pauses key's schedule: nothing is admitted before now+d. The
// caller uses it after Fortnox answered 429 anyway, because other processes
// spend the same budget. Requests already waiting are all moved later by the
// same amount, just enough for the earliest to go at now+d, so they keep
// their order and spacing and the window still holds. That makes repeated
// calls cheap: when every request caught in one 429 storm calls Penalize,
// the second call onwards moves nothing more than the time that passed.
func (l *Limiter) Penalize(key string, d time.Duration) {
	if d <= 0 {
		return
	}
	k := l.lockedState(key)
	defer k.mu.Unlock()
	until := l.clock.Now().Add(d)
	k.pausedUntil = latest(k.pausedUntil, until)
	k.postponeWaiting(until)
}

// postponeWaiting moves every waiting reservation, and its slot in the ring,
// later by as much as it takes for the earliest to be no sooner than until.
func (k *keyState) postponeWaiting(until time.Time) {
	if len(k.waiting) == 0 {
		return
	}
	first := k.waiting[0].slot
	shift := until.Sub(first)
	if shift <= 0 {
		return
	}
	for _, r := range k.waiting {
		r.slot = r.slot.Add(shift)
	}
	// Ring slots at or after the first waiting one belong to waiting or
	// cancelled requests (or to admitted ones sharing its time, which only
	// makes the window stricter); moving them all keeps the ring in order.
	for i, slot := range k.slots {
		if !slot.Before(first) {
			k.slots[i] = slot.Add(shift)
		}
	}
}

// Run sweeps every window until ctx is done.
func (l *Limiter) Run(ctx context.Context) {
	ticker := time.NewTicker(l.window)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			l.sweep()
		}
	}
}

// sweep forgets the keys idle for longer than a window, so that memory for
// tenants that stopped calling is reclaimed. Forgetting loses nothing: with
// no admission in the last window, no one waiting and no pause, a fresh
// schedule admits exactly what the old one would.
func (l *Limiter) sweep() {
	t := l.clock.Now()
	l.states.Range(func(key, v any) bool {
		l.forgetIfIdle(key, v.(*keyState), t)
		return true
	})
}

func (l *Limiter) forgetIfIdle(key any, k *keyState, t time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.idle(t, l.window) {
		return
	}
	k.forgotten = true
	if l.states.CompareAndDelete(key, k) {
		l.tracked.Add(-1)
	}
}

// keys is the number of keys tracked.
func (l *Limiter) keys() int {
	return int(l.tracked.Load())
}

// idle reports whether the schedule constrains nothing after t any more.
func (k *keyState) idle(t time.Time, window time.Duration) bool {
	return len(k.waiting) == 0 &&
		!k.newest().Add(window).After(t) &&
		!k.pausedUntil.After(t)
}

// earliestSlot is the first time at or after now when one more admission
// keeps at most n (1..len(k.slots)) of them in any window-long interval
// and falls outside any pause. The ring holds the last len(k.slots)
// admissions, so the n-th latest is in it; with n = len(k.slots) it is
// slots[next], the oldest.
func (k *keyState) earliestSlot(now time.Time, window time.Duration, n int) time.Time {
	slot := latest(now, k.pausedUntil)
	if !k.full && k.next < n {
		return slot
	}
	i := (k.next - n + len(k.slots)) % len(k.slots)
	return latest(slot, k.slots[i].Add(window))
}

// reserve records slot as the newest admission, pushing out the oldest.
func (k *keyState) reserve(slot time.Time) {
	k.slots[k.next] = slot
	k.next++
	if k.next == len(k.slots) {
		k.next = 0
		k.full = true
	}
}

// newest is the latest reserved slot, or the zero time if there is none.
func (k *keyState) newest() time.Time {
	if !k.full && k.next == 0 {
		return time.Time{}
	}
	if k.next == 0 {
		return k.slots[len(k.slots)-1]
	}
	return k.slots[k.next-1]
}

func latest(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
