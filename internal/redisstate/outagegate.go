package redisstate

import (
	"sync"
	"sync/atomic"
	"time"
)

// The turns Redis gave before an outage still count against Fortnox's
// window after it begins, and some of them have not left yet: a turn
// reserved for later (a request queued behind the budget) sleeps in the
// sidecar it went to. No sidecar can count the others' turns once Redis
// is gone, so the in-process share starts only when every turn Redis may
// have given is out of the window:
//   - a window after the outage began, or after the latest turn this
//     sidecar took, whichever is later;
//   - when this sidecar saw the tenant's turns queue (a wait in the
//     script's answer) in the window and max_wait before the outage, the
//     other sidecars may hold turns up to max_wait ahead too: max_wait
//     later still.
//
// The hold applies once per outage and tenant, as a pause of the
// in-process share (ratelimit.Limiter.Penalize): the share's own arrival
// order and max_wait refusals then hold as before.

// turnsSeen is what this sidecar knows of one tenant's turns in Redis.
type turnsSeen struct {
	leaves   atomic.Int64 // unix ns (the Conn's clock): the latest turn's time to leave
	queuedAt atomic.Int64 // unix ns: the last answer that made a request wait
	heldFor  atomic.Int64 // the outage (its start, unix ns) whose hold was applied
}

// outageGate keeps turnsSeen per tenant key and the longest max_wait asked.
type outageGate struct {
	tenants sync.Map // key -> *turnsSeen
	maxWait atomic.Int64
}

func (g *outageGate) seen(key string) *turnsSeen {
	if v, ok := g.tenants.Load(key); ok {
		return v.(*turnsSeen)
	}
	v, _ := g.tenants.LoadOrStore(key, new(turnsSeen))
	return v.(*turnsSeen)
}

// raise sets a to v unless it holds more already.
func raise(a *atomic.Int64, v int64) {
	for {
		cur := a.Load()
		if v <= cur || a.CompareAndSwap(cur, v) {
			return
		}
	}
}

// noteMaxWait keeps the longest max_wait a request asked for.
func (g *outageGate) noteMaxWait(d time.Duration) { raise(&g.maxWait, int64(d)) }

// noteTurn records a turn Redis gave at now, leaving after need.
func (g *outageGate) noteTurn(key string, now time.Time, need time.Duration) {
	s := g.seen(key)
	raise(&s.leaves, now.Add(need).UnixNano())
	if need > 0 {
		s.queuedAt.Store(now.UnixNano())
	}
}

// hold is how much longer the share must wait at now for key in the
// outage that began at outage (unix ns; 0: none seen yet), the first time
// it is asked for that outage and key; 0 afterwards, or when nothing
// needs waiting for.
func (g *outageGate) hold(key string, outage int64, now time.Time, window time.Duration) time.Duration {
	if outage == 0 {
		return 0
	}
	s := g.seen(key)
	for {
		applied := s.heldFor.Load()
		if applied == outage {
			return 0
		}
		if s.heldFor.CompareAndSwap(applied, outage) {
			break
		}
	}
	start := time.Unix(0, outage)
	until := start.Add(window)
	if leaves := time.Unix(0, s.leaves.Load()); leaves.After(start) {
		until = leaves.Add(window)
	}
	maxWait := time.Duration(g.maxWait.Load())
	if q := s.queuedAt.Load(); q != 0 && start.Sub(time.Unix(0, q)) <= window+maxWait {
		until = latest(until, start.Add(maxWait+window))
	}
	return until.Sub(now)
}

func latest(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
