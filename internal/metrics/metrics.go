// Package metrics holds the plugin's Prometheus collectors: the counters,
// histograms and gauges that the code updates, and the label sets that are
// created up front. They are created once per process; the root package
// registers them into each config's registry (Caddy makes a new registry
// per config load), so counts survive reloads, as Caddy's own
// reverse_proxy metrics do. The gauges computed from the running token
// managers stay in the root, next to the pools they range over.
//
// Labels are low-cardinality: never a tenant, client id, token or secret.
package metrics

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Namespace and Subsystem prefix every series: caddy_fortnox_*.
const (
	Namespace = "caddy"
	Subsystem = "fortnox"
)

// Opts names a series caddy_fortnox_<name>.
func Opts(name, help string) prometheus.Opts {
	return prometheus.Opts{Namespace: Namespace, Subsystem: Subsystem, Name: name, Help: help}
}

var (
	TokenRequests = prometheus.NewCounterVec(prometheus.CounterOpts(Opts("token_requests_total",
		"Token requests sent to Fortnox, by grant and outcome (ok or the error code the app would get).")),
		[]string{"grant", "outcome"})
	TokenDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: Namespace, Subsystem: Subsystem, Name: "token_request_duration_seconds",
		Help:    "How long token requests to Fortnox took, by grant.",
		Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	}, []string{"grant"})
	CacheLookups = prometheus.NewCounterVec(prometheus.CounterOpts(Opts("token_cache_lookups_total",
		"Token lookups by requests: hit (a fresh token was cached) or miss (the request waited for a token request).")),
		[]string{"result"})
	// CacheHit and CacheMiss are resolved once: counting costs no
	// allocation on the cached path.
	CacheHit  = CacheLookups.WithLabelValues("hit")
	CacheMiss = CacheLookups.WithLabelValues("miss")
	Replays   = prometheus.NewCounterVec(prometheus.CounterOpts(Opts("replays_total",
		"Requests Fortnox answered 401: replayed with a new token, or passed through (body not buffered, or the replay got 401 too).")),
		[]string{"outcome"})
	RateLimitWaits = prometheus.NewCounter(prometheus.CounterOpts(Opts("rate_limit_waits_total",
		"Requests that waited for their turn in the per-tenant rate limiter.")))
	RateLimitWait = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: Namespace, Subsystem: Subsystem, Name: "rate_limit_wait_seconds",
		Help:    "How long requests that waited in the rate limiter waited.",
		Buckets: []float64{.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 20, 30},
	})
	RateLimitReject = prometheus.NewCounter(prometheus.CounterOpts(Opts("rate_limit_rejections_total",
		"Requests answered 429 by the sidecar because their wait would pass max_wait or their deadline.")))
	Upstream429 = prometheus.NewCounter(prometheus.CounterOpts(Opts("upstream_429_total",
		"Requests Fortnox answered 429 despite the limiter (other processes share the budget).")))
	TokenRequestsQueued = prometheus.NewCounter(prometheus.CounterOpts(Opts("token_requests_queued_total",
		"Token requests that waited for a free slot (max_token_requests in flight per client id).")))
	InvalidationsBounded = prometheus.NewCounter(prometheus.CounterOpts(Opts("unauthorized_kept_total",
		"Fortnox 401s that did not drop the token: the token was minted seconds ago, or the tenant's invalidations were used up (a wrong path or a missing scope answers 401 too).")))
	KeptAlive = prometheus.NewCounter(prometheus.CounterOpts(Opts("refresh_tokens_kept_alive_total",
		"Stored refresh tokens refreshed because they had not been used for 30 days (Fortnox's die after 45).")))
	RedisErrors = prometheus.NewCounter(prometheus.CounterOpts(Opts("redis_errors_total",
		"Redis calls that failed or timed out in cluster mode (the sidecar falls back as documented, and recovers by itself).")))
	UnencryptedRecords = prometheus.NewCounter(prometheus.CounterOpts(Opts("unencrypted_records_total",
		"Token records found unencrypted while encryption_key is set: never used (503) until `caddy fortnox encrypt` rewrites them.")))
	Refusals = newRefusals()

	// Requests counts the requests the fortnox handler answered, by who
	// answered (Fortnox, or the sidecar itself) and status class.
	Requests = prometheus.NewCounterVec(prometheus.CounterOpts(Opts("requests_total",
		"Requests the fortnox handler answered: answered_by fortnox (Fortnox's answer, passed on) or sidecar (the sidecar's own error answer, or reverse_proxy's when Fortnox cannot be reached), by status class.")),
		[]string{"answered_by", "class"})
	// ErrorAnswers counts the sidecar's own JSON error answers by code.
	ErrorAnswers = prometheus.NewCounterVec(prometheus.CounterOpts(Opts("error_answers_total",
		"JSON error answers the sidecar wrote itself (fortnox handler, fortnox_webhook, admin API), by error code.")),
		[]string{"error"})
	// RedisDuration times the Redis calls that were sent (cluster mode).
	RedisDuration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: Namespace, Subsystem: Subsystem, Name: "redis_call_duration_seconds",
		Help:    "How long the Redis calls sent in cluster mode took (failed ones included; calls refused at once during an outage are not sent).",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
	})
	// MaxWait is the max_wait of the fortnox handler loaded last.
	MaxWait = prometheus.NewGauge(prometheus.GaugeOpts(Opts("rate_limit_max_wait_seconds",
		"max_wait of the fortnox handler loaded last: the longest a request waits for its turn before it is answered 429.")))
)

// Collectors lists this package's collectors, for registration.
func Collectors() []prometheus.Collector {
	return []prometheus.Collector{
		TokenRequests, TokenDuration, CacheLookups, Replays,
		RateLimitWaits, RateLimitWait, RateLimitReject,
		Upstream429, TokenRequestsQueued, InvalidationsBounded,
		KeptAlive, RedisErrors, UnencryptedRecords, Refusals,
		Requests, ErrorAnswers, RedisDuration, MaxWait,
	}
}

// refusalKinds are the app's usual refusals, exported at 0 from the start
// (dashboards, alerts).
var refusalKinds = []string{"missing_tenant", "invalid_tenant", "ambiguous_tenant", "tenant_not_allowed", "invalid_account", "ambiguous_account",
	"tenant_not_authorized", "account_not_authorized", "refresh_token_rejected", "token_endpoint_unavailable", "token_storage_unavailable", "bad_signature"}

func newRefusals() *prometheus.CounterVec {
	v := prometheus.NewCounterVec(prometheus.CounterOpts(Opts("refusals_total",
		"Requests the sidecar refused, by kind (the error code of the answer), each one counted, also those whose log line was left out.")),
		[]string{"kind"})
	for _, kind := range refusalKinds {
		v.WithLabelValues(kind)
	}
	return v
}

// The children of Requests are resolved once: counting costs no
// allocation.
var (
	statusClasses = [6]string{"other", "1xx", "2xx", "3xx", "4xx", "5xx"}
	fortnoxByCode [6]prometheus.Counter // by status/100; [0]: unknown
	sidecarByCode [6]prometheus.Counter
)

func init() {
	for i, class := range statusClasses {
		fortnoxByCode[i] = Requests.WithLabelValues("fortnox", class)
		sidecarByCode[i] = Requests.WithLabelValues("sidecar", class)
	}
}

func statusClass(status int) int {
	if c := status / 100; c >= 1 && c <= 5 {
		return c
	}
	return 0
}

// FortnoxAnswered counts an answer of Fortnox passed on to the app.
func FortnoxAnswered(status int) { fortnoxByCode[statusClass(status)].Inc() }

// SidecarAnswered counts an answer the sidecar gave in Fortnox's stead.
func SidecarAnswered(status int) { sidecarByCode[statusClass(status)].Inc() }

// errorByCode holds the resolved children of ErrorAnswers for the known
// error codes (see KnowErrorCodes).
var errorByCode atomic.Pointer[map[string]prometheus.Counter]

// KnowErrorCodes creates the ErrorAnswers series of every known error code
// (at 0, so that a first error shows as an increase), and resolves them
// once so that counting them costs no allocation.
func KnowErrorCodes(codes []string) {
	m := make(map[string]prometheus.Counter, len(codes))
	for _, code := range codes {
		m[code] = ErrorAnswers.WithLabelValues(code)
	}
	errorByCode.Store(&m)
}

// ErrorAnswered counts a JSON error answer by its code.
func ErrorAnswered(code string) {
	if m := errorByCode.Load(); m != nil {
		if c, ok := (*m)[code]; ok {
			c.Inc()
			return
		}
	}
	ErrorAnswers.WithLabelValues(code).Inc() // a code missing from the known ones
}

// KnowTokenOutcomes creates the label sets of TokenRequests and
// TokenDuration for every grant and outcome, and those of Replays, so that
// the series the dashboard and the alerts name exist from the start.
func KnowTokenOutcomes(grants, outcomes []string) {
	for _, grant := range grants {
		TokenDuration.WithLabelValues(grant)
		for _, outcome := range outcomes {
			TokenRequests.WithLabelValues(grant, outcome)
		}
	}
	for _, outcome := range []string{"replayed", "passed_through", "no_token", "no_turn"} {
		Replays.WithLabelValues(outcome)
	}
}
