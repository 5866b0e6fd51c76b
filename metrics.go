package fortnox

import (
	"errors"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The plugin's Prometheus metrics. They are created once per process and
// registered into each config's registry (Caddy makes a new registry per
// config load), so counts survive reloads, as Caddy's own reverse_proxy
// metrics do. Labels are low-cardinality: never a tenant, client id, token
// or secret.
var metrics = struct {
	once sync.Once

	tokenRequests   *prometheus.CounterVec
	tokenDuration   *prometheus.HistogramVec
	cacheLookups    *prometheus.CounterVec
	cacheHit        prometheus.Counter
	cacheMiss       prometheus.Counter
	replays         *prometheus.CounterVec
	rateLimitWaits  prometheus.Counter
	rateLimitWait   prometheus.Histogram
	rateLimitReject prometheus.Counter
	upstream429     prometheus.Counter
	tenantsCached   prometheus.GaugeFunc

	tokenRequestsQueued  prometheus.Counter
	invalidationsBounded prometheus.Counter
	keptAlive            prometheus.Counter
	redisErrors          prometheus.Counter
	refreshTokenOldest   prometheus.GaugeFunc

	unencryptedRecords prometheus.Counter
	refusals           *prometheus.CounterVec
}{}

const metricsNamespace = "caddy"
const metricsSubsystem = "fortnox"

func initMetrics() {
	metrics.once.Do(func() {
		opts := func(name, help string) prometheus.Opts {
			return prometheus.Opts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help}
		}
		metrics.tokenRequests = prometheus.NewCounterVec(prometheus.CounterOpts(opts("token_requests_total",
			"Token requests sent to Fortnox, by grant and outcome (ok or the error code the app would get).")),
			[]string{"grant", "outcome"})
		metrics.tokenDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "token_request_duration_seconds",
			Help:    "How long token requests to Fortnox took, by grant.",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"grant"})
		metrics.cacheLookups = prometheus.NewCounterVec(prometheus.CounterOpts(opts("token_cache_lookups_total",
			"Token lookups by requests: hit (a fresh token was cached) or miss (the request waited for a token request).")),
			[]string{"result"})
		metrics.cacheHit = metrics.cacheLookups.WithLabelValues("hit")
		metrics.cacheMiss = metrics.cacheLookups.WithLabelValues("miss")
		metrics.replays = prometheus.NewCounterVec(prometheus.CounterOpts(opts("replays_total",
			"Requests Fortnox answered 401: replayed with a new token, or passed through (body not buffered, or the replay got 401 too).")),
			[]string{"outcome"})
		metrics.rateLimitWaits = prometheus.NewCounter(prometheus.CounterOpts(opts("rate_limit_waits_total",
			"Requests that waited for their turn in the per-tenant rate limiter.")))
		metrics.rateLimitWait = prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "rate_limit_wait_seconds",
			Help:    "How long requests that waited in the rate limiter waited.",
			Buckets: []float64{.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 20, 30},
		})
		metrics.rateLimitReject = prometheus.NewCounter(prometheus.CounterOpts(opts("rate_limit_rejections_total",
			"Requests answered 429 by the sidecar because their wait would pass max_wait or their deadline.")))
		metrics.upstream429 = prometheus.NewCounter(prometheus.CounterOpts(opts("upstream_429_total",
			"Requests Fortnox answered 429 despite the limiter (other processes share the budget).")))
		metrics.tokenRequestsQueued = prometheus.NewCounter(prometheus.CounterOpts(opts("token_requests_queued_total",
			"Token requests that waited for a free slot (max_token_requests in flight per client id).")))
		metrics.invalidationsBounded = prometheus.NewCounter(prometheus.CounterOpts(opts("unauthorized_kept_total",
			"Fortnox 401s that did not drop the token: the token was minted seconds ago, or the tenant's invalidations were used up (a wrong path or a missing scope answers 401 too).")))
		metrics.keptAlive = prometheus.NewCounter(prometheus.CounterOpts(opts("refresh_tokens_kept_alive_total",
			"Stored refresh tokens refreshed because they had not been used for 30 days (Fortnox's die after 45).")))
		metrics.redisErrors = prometheus.NewCounter(prometheus.CounterOpts(opts("redis_errors_total",
			"Redis calls that failed or timed out in cluster mode (the sidecar falls back as documented, and recovers by itself).")))
		metrics.refreshTokenOldest = prometheus.NewGaugeFunc(prometheus.GaugeOpts(opts("refresh_token_oldest_age_seconds",
			"Age of the oldest stored refresh token at the last hourly keep-alive pass (Fortnox's die after 45 days unused; the sidecar refreshes them at 30).")), oldestRefreshToken)
		metrics.unencryptedRecords = prometheus.NewCounter(prometheus.CounterOpts(opts("unencrypted_records_total",
			"Token records found unencrypted while encryption_key is set: never used (503) until `caddy fortnox encrypt` rewrites them.")))
		metrics.refusals = prometheus.NewCounterVec(prometheus.CounterOpts(opts("refusals_total",
			"Requests the sidecar refused, by kind (the error code of the answer), each one counted, also those whose log line was left out.")),
			[]string{"kind"})
		// Exported from the start (dashboards, alerts), the app's usual
		// refusals at 0.
		for _, kind := range []string{"missing_tenant", "invalid_tenant", "ambiguous_tenant", "tenant_not_allowed", "invalid_account", "ambiguous_account",
			"tenant_not_authorized", "account_not_authorized", "refresh_token_rejected", "token_endpoint_unavailable", "token_storage_unavailable", "bad_signature"} {
			metrics.refusals.WithLabelValues(kind)
		}
		metrics.tenantsCached = prometheus.NewGaugeFunc(prometheus.GaugeOpts(opts("tenants_cached",
			"Tenants with a cached access token, over all client ids.")), countCachedTenants)
	})
}

// registerMetrics registers the plugin's collectors into a config's
// registry; registering them twice (several handlers) is fine.
func registerMetrics(reg *prometheus.Registry) error {
	initMetrics()
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		metrics.tokenRequests, metrics.tokenDuration, metrics.cacheLookups, metrics.replays,
		metrics.rateLimitWaits, metrics.rateLimitWait, metrics.rateLimitReject,
		metrics.upstream429, metrics.tenantsCached, metrics.tokenRequestsQueued, metrics.invalidationsBounded,
		metrics.keptAlive, metrics.refreshTokenOldest, metrics.redisErrors,
		metrics.unencryptedRecords, metrics.refusals,
	} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}

func countCachedTenants() float64 {
	n := 0
	managers.Range(func(_, v any) bool {
		m := v.(*tokenManager)
		at := now().UnixNano()
		for _, item := range m.cache.Items() {
			if item.Object.(*cachedToken).usableAt(at) {
				n++
			}
		}
		return true
	})
	return float64(n)
}

// metricsTokenRequest counts a token request that was sent (took > 0).
func metricsTokenRequest(grant, outcome string, took time.Duration) {
	if took <= 0 {
		return
	}
	metrics.tokenRequests.WithLabelValues(grant, outcome).Inc()
	metrics.tokenDuration.WithLabelValues(grant).Observe(took.Seconds())
}

func oldestRefreshToken() float64 {
	var oldest int64
	managers.Range(func(_, v any) bool {
		oldest = max(oldest, v.(*tokenManager).oldestRefreshToken.Load())
		return true
	})
	return float64(oldest)
}
