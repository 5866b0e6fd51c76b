package tokens

import (
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
)

// metricsTokenRequest counts a token request that was sent (took > 0).
func metricsTokenRequest(grant, outcome string, took time.Duration) {
	if took <= 0 {
		return
	}
	metrics.TokenRequests.WithLabelValues(grant, outcome).Inc()
	metrics.TokenDuration.WithLabelValues(grant).Observe(took.Seconds())
}
