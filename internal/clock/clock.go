// Package clock is the plugin's clock: time.Now plus an offset that tests
// move, so that token expiry, refresh-ahead and backoff are tested without
// sleeping through them.
//
// Clock is a concrete type, not an interface, so that reading it on the
// cached path is an inlined atomic load and a time.Now, with no interface
// call and no allocation. Production code never moves it.
package clock

import (
	"sync/atomic"
	"time"
)

// Clock is time.Now plus an offset. The zero value reads real time; a nil
// *Clock does too. Moving it while other goroutines read it is race-free.
type Clock struct {
	offset atomic.Int64 // nanoseconds
}

// New returns a clock that reads real time until a test moves it.
func New() *Clock { return &Clock{} }

// Now is time.Now plus the clock's offset.
func (c *Clock) Now() time.Time {
	if c == nil {
		return time.Now()
	}
	return time.Now().Add(time.Duration(c.offset.Load()))
}

// Advance moves the clock by d (backwards when d is negative).
func (c *Clock) Advance(d time.Duration) { c.offset.Add(int64(d)) }

// Offset is how far the clock has been moved from real time.
func (c *Clock) Offset() time.Duration { return time.Duration(c.offset.Load()) }

// Set puts the clock at offset d from real time.
func (c *Clock) Set(d time.Duration) { c.offset.Store(int64(d)) }

// Reset puts the clock back on real time.
func (c *Clock) Reset() { c.offset.Store(0) }
