package fortnox

import (
	"errors"
	"strings"
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
	return registerOpsMetrics(reg)
}

func countCachedTenants() float64 {
	n := 0
	managers.Range(func(_, v any) bool {
		m := v.(*tokenManager)
		at := clk.Now().UnixNano()
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

// The series the dashboard (deploy/grafana) and the alert rules
// (deploy/prometheus) read besides the ones above. Every series they name
// is exported from a sidecar's start: the label sets they use are created
// at registration, so that a first failure shows as an increase from 0
// rather than as a series that appears (which rate() and increase() miss).
var opsMetrics = newOpsMetrics()

type opsMetricSet struct {
	// requests counts the requests the fortnox handler answered, by who
	// answered (Fortnox, or the sidecar itself) and status class. Children
	// are resolved once: counting costs no allocation.
	requests      *prometheus.CounterVec
	fortnoxByCode [6]prometheus.Counter // by status/100; [0]: unknown
	sidecarByCode [6]prometheus.Counter
	// errorAnswers counts the sidecar's own JSON error answers by code.
	errorAnswers *prometheus.CounterVec
	errorByCode  map[string]prometheus.Counter
	// redisDuration times the Redis calls that were sent (cluster mode).
	redisDuration prometheus.Histogram
	// maxWait is the max_wait of the fortnox handler loaded last.
	maxWait prometheus.Gauge
	// chains counts the refresh-token chains or consents a person must
	// renew (computed at scrape).
	chains *reconnectCollector
}

var statusClasses = [6]string{"other", "1xx", "2xx", "3xx", "4xx", "5xx"}

func newOpsMetrics() *opsMetricSet {
	opts := func(name, help string) prometheus.Opts {
		return prometheus.Opts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help}
	}
	o := &opsMetricSet{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts(opts("requests_total",
			"Requests the fortnox handler answered: answered_by fortnox (Fortnox's answer, passed on) or sidecar (the sidecar's own error answer, or reverse_proxy's when Fortnox cannot be reached), by status class.")),
			[]string{"answered_by", "class"}),
		errorAnswers: prometheus.NewCounterVec(prometheus.CounterOpts(opts("error_answers_total",
			"JSON error answers the sidecar wrote itself (fortnox handler, fortnox_webhook, admin API), by error code.")),
			[]string{"error"}),
		errorByCode: make(map[string]prometheus.Counter, len(errorNumbers)),
		redisDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "redis_call_duration_seconds",
			Help:    "How long the Redis calls sent in cluster mode took (failed ones included; calls refused at once during an outage are not sent).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}),
		maxWait: prometheus.NewGauge(prometheus.GaugeOpts(opts("rate_limit_max_wait_seconds",
			"max_wait of the fortnox handler loaded last: the longest a request waits for its turn before it is answered 429."))),
		chains: &reconnectCollector{desc: prometheus.NewDesc(
			prometheus.BuildFQName(metricsNamespace, metricsSubsystem, "chains_needing_reconnect"),
			"Tenants (service account) and named user accounts this sidecar saw fail for want of an authorization: a rejected refresh token, a revoked consent, a token of another tenant or user, or a known tenant left without consent and refresh token. The customer or user must authorize again.",
			[]string{"account_type"}, nil)},
	}
	for i, class := range statusClasses {
		o.fortnoxByCode[i] = o.requests.WithLabelValues("fortnox", class)
		o.sidecarByCode[i] = o.requests.WithLabelValues("sidecar", class)
	}
	for code := range errorNumbers {
		o.errorByCode[code] = o.errorAnswers.WithLabelValues(code)
	}
	return o
}

func (o *opsMetricSet) collectors() []prometheus.Collector {
	return []prometheus.Collector{o.requests, o.errorAnswers, o.redisDuration, o.maxWait, o.chains}
}

func statusClass(status int) int {
	if c := status / 100; c >= 1 && c <= 5 {
		return c
	}
	return 0
}

// fortnoxAnswered counts an answer of Fortnox passed on to the app.
func (o *opsMetricSet) fortnoxAnswered(status int) { o.fortnoxByCode[statusClass(status)].Inc() }

// sidecarAnswered counts an answer the sidecar gave in Fortnox's stead.
func (o *opsMetricSet) sidecarAnswered(status int) { o.sidecarByCode[statusClass(status)].Inc() }

// errorAnswered counts a JSON error answer by its code.
func (o *opsMetricSet) errorAnswered(code string) {
	if c, ok := o.errorByCode[code]; ok {
		c.Inc()
		return
	}
	o.errorAnswers.WithLabelValues(code).Inc() // a code missing from errorNumbers (TestErrorNumbers)
}

// registerOpsMetrics registers opsMetrics, and creates the label sets of
// the older series that the dashboard and the alerts name.
func registerOpsMetrics(reg *prometheus.Registry) error {
	for _, grant := range []string{grantClientCredentials, grantRefreshToken, grantAuthorizationCode} {
		metrics.tokenDuration.WithLabelValues(grant)
		metrics.tokenRequests.WithLabelValues(grant, "ok")
		for _, f := range allTokenFailures() {
			metrics.tokenRequests.WithLabelValues(grant, (&tokenError{failure: f}).errorCode())
		}
	}
	for _, outcome := range []string{"replayed", "passed_through", "no_token", "no_turn"} {
		metrics.replays.WithLabelValues(outcome)
	}
	for _, c := range opsMetrics.collectors() {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}

// allTokenFailures lists every tokenFailure, up to the first value that
// has no name of its own.
func allTokenFailures() []tokenFailure {
	var all []tokenFailure
	for f := failNoConsent; f < failNoConsent+64; f++ {
		if (&tokenError{failure: f}).Error() == "token error" {
			break
		}
		all = append(all, f)
	}
	return all
}

// reconnectCollector reports chains_needing_reconnect by account type,
// from what the token managers remember about their subjects.
type reconnectCollector struct {
	desc *prometheus.Desc
}

func (c *reconnectCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *reconnectCollector) Collect(ch chan<- prometheus.Metric) {
	var service, user int
	managers.Range(func(_, v any) bool {
		m := v.(*tokenManager)
		m.mu.Lock()
		for key, st := range m.tenants {
			if !needsReconnect(st) {
				continue
			}
			if strings.Contains(key, "/") {
				user++
			} else {
				service++
			}
		}
		m.mu.Unlock()
		return true
	})
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(service), "service")
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(user), "user")
}

// needsReconnect says whether a subject's last failure needs a person to
// authorize again. A subject that never had a token (a made-up TenantId,
// a customer who never connected) is not a broken chain.
func needsReconnect(st *tenantState) bool {
	if st.consentRevoked {
		return true
	}
	e := st.lastError
	if e == nil {
		return false
	}
	switch e.failure {
	case failGrantRejected, failConsentRevoked, failUserMismatch:
		return true
	case failTenantMismatch:
		return !e.fromClientCredentials
	case failNoConsent, failAccountNotAuthorized:
		return !st.unknown
	}
	return false
}
