package tokens

import (
	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
)

// clk is the plugin's clock: time.Now plus an offset that tests move
// (clk.Advance), so that token expiry, refresh-ahead and backoff are tested
// without sleeping through them. Production code never moves it.
// It is one per process for now; each Manager will hold its own.
var Clock = clock.New()
