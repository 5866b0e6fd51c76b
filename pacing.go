package fortnox

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"github.com/caddy-fortnox/caddy-fortnox/internal/ratelimit"
	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/caddy/v2"
	"go.opentelemetry.io/otel/trace"
)

// Defaults for the rate limiter: Fortnox allows 25 requests per 5 seconds
// per client id and tenant.
const (
	defaultRateRequests    = 25
	defaultRateWindow      = 5 * time.Second
	defaultMaxWait         = 20 * time.Second
	defaultReplayBodyLimit = 1 << 20
)

// limiters holds one rate limiter per (token_url, client_id, limit,
// window), shared by the configs that use it, so that the budget is one per
// process and survives a reload that does not change it.
var limiters = caddy.NewUsagePool()

// sharedLimiter is a rate limiter with its sweeper.
type sharedLimiter struct {
	*ratelimit.Limiter
	stop context.CancelFunc
}

func (s *sharedLimiter) Destruct() error {
	s.stop()
	return nil
}

// jitterMargin is added to the configured window. The limiter admits the
// 26th request exactly one window after the first; requests reach Fortnox
// with some jitter, so without a margin Fortnox could count 26 in its window.
func jitterMargin(window time.Duration) time.Duration {
	return min(window/25, 250*time.Millisecond)
}

// pacer is a handler's pacing: its tenants' rate budget, the limit it
// enforces (for the 429's message and Fortnox's own 429s) and how long a
// request may wait for its turn.
type pacer struct {
	turns    ratelimit.Waiter // nil when rate_limit is off
	requests int
	window   time.Duration // 0 when rate_limit is off
	maxWait  time.Duration
	poolKey  string // the limiters key this handler holds, "" if none
}

// newPacer reads the handler's rate_limit and max_wait, and takes its
// share of the process's limiter for (token_url, client_id, limit,
// window); in cluster mode the budget is Redis's, with that limiter as the
// fallback. On error, the pacer holds what it took (release it).
func newPacer(rl *RateLimit, maxWait caddy.Duration, clientID, tokenURL string, cluster *redisstate.Conn) (pacer, error) {
	var p pacer
	requests, window := defaultRateRequests, defaultRateWindow
	p.maxWait = time.Duration(maxWait)
	if p.maxWait == 0 {
		p.maxWait = defaultMaxWait
	}
	if p.maxWait < 0 {
		return p, errors.New("max_wait must not be negative")
	}
	if rl != nil {
		if rl.Off {
			p.window = 0
			return p, nil
		}
		if rl.Requests != 0 {
			requests = rl.Requests
		}
		if rl.Window != 0 {
			window = time.Duration(rl.Window)
		}
		if requests < 1 || window <= 0 {
			return p, fmt.Errorf("rate_limit must allow at least 1 request per positive window, got %d per %v", requests, window)
		}
	}
	p.window = window
	effective := window + jitterMargin(window)
	p.poolKey = fmt.Sprintf("%s\x00%d\x00%d", managerKey(tokenURL, clientID), requests, effective)
	val, _, err := limiters.LoadOrNew(p.poolKey, func() (caddy.Destructor, error) {
		ctx, stop := context.WithCancel(context.Background())
		l := ratelimit.New(requests, effective, clk)
		go l.Run(ctx)
		return &sharedLimiter{Limiter: l, stop: stop}, nil
	})
	if err != nil {
		return p, err
	}
	local := val.(*sharedLimiter).Limiter
	p.turns, p.requests = local, requests
	if cluster != nil {
		p.turns = redisstate.NewLimiter(cluster, requests, effective, local)
	}
	return p, nil
}

// release gives back the pacer's share of its limiter.
func (p *pacer) release() error {
	if p.poolKey == "" {
		return nil
	}
	_, err := limiters.Delete(p.poolKey)
	return err
}

// penalize slows the tenant down for d after Fortnox answered 429.
func (p *pacer) penalize(tenant string, d time.Duration) {
	if p.turns != nil {
		p.turns.Penalize(tenant, d)
	}
}

// waitTurn waits for the tenant's turn in the rate limiter and says how
// long it waited. It answers the request itself and returns false when
// the wait would be too long.
func (p *pacer) waitTurn(w http.ResponseWriter, r *http.Request, tenant string) (time.Duration, bool) {
	waited, err := p.turns.Wait(r.Context(), tenant, p.maxWait)
	if err == nil {
		if waited > 0 {
			metrics.RateLimitWaits.Inc()
			metrics.RateLimitWait.Observe(waited.Seconds())
			traceTurn(r, tenant, waited, nil)
		}
		return waited, true
	}
	traceTurn(r, tenant, waited, err)
	var rle *ratelimit.Error
	if errors.As(err, &rle) {
		metrics.RateLimitReject.Inc()
		writeAppError(w, http.StatusTooManyRequests, "rate_limited",
			fmt.Sprintf("Too many requests for tenant %s: Fortnox allows %d per %v, and this request would have waited longer than max_wait (or its own deadline). Retry after the number of seconds in Retry-After, or raise max_wait.",
				tenant, p.requests, p.window), rle.RetryAfter)
		return 0, false
	}
	// The client went away while it waited.
	writeAppError(w, http.StatusServiceUnavailable, "request_cancelled",
		"The request ended while it waited for its turn in the rate limiter.", time.Second)
	return 0, false
}

// traceTurn records a wait for the tenant's turn (or a refusal) as a
// fortnox.rate_limit span, after the fact: a request that did not wait
// never looks for its span, so the cached path costs the same with
// tracing on or off.
func traceTurn(r *http.Request, tenant string, waited time.Duration, err error) {
	_, span := tokens.StartSpan(r.Context(), tokens.SpanRateLimit, tokens.Subject{Tenant: tenant},
		trace.WithTimestamp(time.Now().Add(-waited)))
	span.EndErr(err)
}
