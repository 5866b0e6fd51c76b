package fortnox

import (
	"sync/atomic"
	"time"
)

// clockOffset moves the plugin's clock forward in tests, so that token
// expiry, refresh-ahead and backoff are tested without sleeping through
// them. It is an atomic so that moving it while requests run is race-free.
// Production code never writes it.
var clockOffset atomic.Int64

// now is the plugin's clock: time.Now plus the test offset.
func now() time.Time {
	return time.Now().Add(time.Duration(clockOffset.Load()))
}

// advanceClock moves the plugin's clock forward by d (tests only).
func advanceClock(d time.Duration) {
	clockOffset.Add(int64(d))
}
