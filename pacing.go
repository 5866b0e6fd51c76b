package fortnox

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"github.com/caddy-fortnox/caddy-fortnox/internal/ratelimit"
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

func (h *Handler) provisionRateLimit(clientID, tokenURL string) error {
	requests, window := defaultRateRequests, defaultRateWindow
	h.maxWait = time.Duration(h.MaxWait)
	if h.maxWait == 0 {
		h.maxWait = defaultMaxWait
	}
	if h.maxWait < 0 {
		return errors.New("max_wait must not be negative")
	}
	if rl := h.RateLimit; rl != nil {
		if rl.Off {
			h.rateWindow = 0
			return nil
		}
		if rl.Requests != 0 {
			requests = rl.Requests
		}
		if rl.Window != 0 {
			window = time.Duration(rl.Window)
		}
		if requests < 1 || window <= 0 {
			return fmt.Errorf("rate_limit must allow at least 1 request per positive window, got %d per %v", requests, window)
		}
	}
	h.rateWindow = window
	effective := window + jitterMargin(window)
	h.limiterKey = fmt.Sprintf("%s\x00%d\x00%d", managerKey(tokenURL, clientID), requests, effective)
	val, _, err := limiters.LoadOrNew(h.limiterKey, func() (caddy.Destructor, error) {
		ctx, stop := context.WithCancel(context.Background())
		l := ratelimit.New(requests, effective, clk)
		go l.Run(ctx)
		return &sharedLimiter{Limiter: l, stop: stop}, nil
	})
	if err != nil {
		return err
	}
	local := val.(*sharedLimiter).Limiter
	h.limiter, h.rateRequests = local, requests
	if h.cluster != nil {
		h.limiter = &redisLimiter{c: h.cluster, limit: requests, window: effective, local: local}
	}
	return nil
}

// waitTurn waits for the tenant's turn in the rate limiter and says how
// long it waited. It answers the request itself and returns false when
// the wait would be too long.
func (h *Handler) waitTurn(w http.ResponseWriter, r *http.Request, tenant string) (time.Duration, bool) {
	waited, err := h.limiter.Wait(r.Context(), tenant, h.maxWait)
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
				tenant, h.rateRequests, h.rateWindow), rle.RetryAfter)
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
	_, span := startSpan(r.Context(), spanRateLimit, subject{tenant: tenant},
		trace.WithTimestamp(time.Now().Add(-waited)))
	span.endErr(err)
}
