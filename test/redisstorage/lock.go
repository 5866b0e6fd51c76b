package redisstorage

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/bsm/redislock"
)

// Backoff between attempts of a blocked Lock: it starts at minLockBackoff
// and doubles up to maxLockBackoff, each wait jittered down by up to half.
const (
	minLockBackoff = 5 * time.Millisecond
	maxLockBackoff = 100 * time.Millisecond
)

// ErrLockNotHeld is returned (wrapped) by Unlock for a name this Storage
// instance does not hold, and for a lock that expired before Unlock (its
// holder failed to refresh it in time, so another holder may have had it).
var ErrLockNotHeld = errors.New("redisstorage: lock not held")

// heldLock is a lock this instance holds and keeps alive.
type heldLock struct {
	lock   *redislock.Lock
	cancel context.CancelFunc // stops the refresher
	done   chan struct{}      // closed when the refresher has stopped
}

// Lock blocks until it holds the lock for name, or ctx is done, or Redis
// fails. While held, the lock is refreshed every TTL/3 in the background
// until Unlock; if this process dies, the lock frees itself within the TTL.
// Lock excludes every holder of the same name and prefix on the same
// Redis server, including other goroutines using this same Storage.
func (s *Storage) Lock(ctx context.Context, name string) error {
	backoff := minLockBackoff
	for {
		ok, err := s.TryLock(ctx, name)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("redisstorage: lock %s: %w", name, context.Cause(ctx))
		case <-t.C:
		}
		backoff = min(2*backoff, maxLockBackoff)
	}
}

// TryLock makes one attempt at the lock for name and reports whether it got
// it; a lock it gets is kept alive until Unlock, as with Lock.
func (s *Storage) TryLock(ctx context.Context, name string) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, fmt.Errorf("redisstorage: lock %s: %w", name, context.Cause(ctx))
	}
	l, err := s.locker.Obtain(ctx, s.lockKey(name), s.ttl, nil)
	if errors.Is(err, redislock.ErrNotObtained) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("redisstorage: lock %s: %w", name, err)
	}
	rctx, cancel := context.WithCancel(context.Background())
	h := &heldLock{lock: l, cancel: cancel, done: make(chan struct{})}
	go s.keepFresh(rctx, h)

	s.mu.Lock()
	// An entry already here is a lock of ours that expired without an
	// Unlock (its refresher could not reach Redis in time); it is gone
	// from Redis, so stop maintaining it.
	old := s.held[name]
	s.held[name] = h
	s.mu.Unlock()
	if old != nil {
		old.stop()
	}
	return true, nil
}

// keepFresh extends h's lock to a full TTL every TTL/3 until ctx is
// cancelled or the lock turns out to be lost. A failed refresh is retried
// at the next tick; the lock survives as long as one refresh per TTL works.
func (s *Storage) keepFresh(ctx context.Context, h *heldLock) {
	defer close(h.done)
	interval := s.ttl / 3
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, interval)
		err := h.lock.Refresh(rctx, s.ttl, nil)
		cancel()
		if errors.Is(err, redislock.ErrNotObtained) {
			return // expired; Unlock will report it
		}
	}
}

// stop stops the refresher and waits for it to finish.
func (h *heldLock) stop() {
	h.cancel()
	<-h.done
}

// Unlock releases the lock for name, which this Storage instance must hold
// (by Lock or TryLock). If the lock expired before Unlock, the error wraps
// ErrLockNotHeld: the critical section may not have been exclusive.
func (s *Storage) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	h := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if h == nil {
		return fmt.Errorf("unlock %s: %w by this storage instance", name, ErrLockNotHeld)
	}
	h.stop()
	err := h.lock.Release(ctx)
	s.maybeIdle()
	if errors.Is(err, redislock.ErrLockNotHeld) {
		return fmt.Errorf("unlock %s: %w (it expired before Unlock)", name, ErrLockNotHeld)
	}
	if err != nil {
		return fmt.Errorf("redisstorage: unlock %s: %w", name, err)
	}
	return nil
}

// abandonLock forgets the lock for name and stops refreshing it without
// releasing it, as if this process had died holding it. Tests use it to
// show that a dead holder's lock frees itself within the TTL.
func (s *Storage) abandonLock(name string) {
	s.mu.Lock()
	h := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if h != nil {
		h.stop()
	}
	s.maybeIdle()
}

// whenUnlocked runs f now if this instance holds no locks, or else once
// the last of its locks has been unlocked. The Caddy module uses it to
// close its Redis client on Cleanup without pulling the connection from
// under a holder that is still inside its critical section.
func (s *Storage) whenUnlocked(f func()) {
	s.mu.Lock()
	if len(s.held) > 0 {
		s.onIdle = f
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	f()
}

// maybeIdle runs the pending whenUnlocked function if no locks are held.
func (s *Storage) maybeIdle() {
	s.mu.Lock()
	f := s.onIdle
	if f == nil || len(s.held) > 0 {
		s.mu.Unlock()
		return
	}
	s.onIdle = nil
	s.mu.Unlock()
	f()
}
