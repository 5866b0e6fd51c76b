package tokens

import (
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
)

// metricsTokenRequest counts a token request that was sent (took > 0).
func metricsTokenRequest(grant Grant, outcome string, took time.Duration) {
	if took <= 0 {
		return
	}
	metrics.TokenRequests.WithLabelValues(string(grant), outcome).Inc()
	metrics.TokenDuration.WithLabelValues(string(grant)).Observe(took.Seconds())
}
