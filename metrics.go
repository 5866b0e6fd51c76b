package fortnox

import (
	"errors"
	"strings"
	"sync"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/prometheus/client_golang/prometheus"
)

// The gauges computed at scrape from the running token managers; the
// other collectors are in internal/metrics. They are created once per
// process (initMetrics, at init) and registered into each config's
// registry, so counts survive reloads.
var poolGauges = struct {
	once sync.Once

	tenantsCached      prometheus.GaugeFunc
	refreshTokenOldest prometheus.GaugeFunc
	chains             *reconnectCollector
}{}

func initMetrics() {
	poolGauges.once.Do(func() {
		poolGauges.refreshTokenOldest = prometheus.NewGaugeFunc(prometheus.GaugeOpts(metrics.Opts("refresh_token_oldest_age_seconds",
			"Age of the oldest stored refresh token at the last hourly keep-alive pass (Fortnox's die after 45 days unused; the sidecar refreshes them at 30).")), oldestRefreshTokenAge)
		poolGauges.tenantsCached = prometheus.NewGaugeFunc(prometheus.GaugeOpts(metrics.Opts("tenants_cached",
			"Tenants with a cached access token, over all client ids.")), countCachedTenants)
		// chains counts the refresh-token chains or consents a person must
		// renew (computed at scrape).
		poolGauges.chains = &reconnectCollector{desc: prometheus.NewDesc(
			prometheus.BuildFQName(metrics.Namespace, metrics.Subsystem, "chains_needing_reconnect"),
			"Tenants (service account) and named user accounts this sidecar saw fail for want of an authorization: a rejected refresh token, a revoked consent, a token of another tenant or user, or a known tenant left without consent and refresh token. The customer or user must authorize again.",
			[]string{"account_type"}, nil)}
		codes := make([]string, 0, len(errorNumbers))
		for code := range errorNumbers {
			codes = append(codes, code)
		}
		metrics.KnowErrorCodes(codes)
	})
}

// registerMetrics registers the plugin's collectors into a config's
// registry; registering them twice (several handlers) is fine.
func registerMetrics(reg *prometheus.Registry) error {
	initMetrics()
	if reg == nil {
		return nil
	}
	outcomes := []string{"ok"}
	for _, f := range allTokenFailures() {
		outcomes = append(outcomes, (&tokens.Error{Failure: f}).ErrorCode())
	}
	metrics.KnowTokenOutcomes([]string{tokens.GrantClientCredentials.String(), tokens.GrantRefreshToken.String(), tokens.GrantAuthorizationCode.String()}, outcomes)
	for _, c := range append(metrics.Collectors(), poolGauges.tenantsCached, poolGauges.refreshTokenOldest, poolGauges.chains) {
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
		m := v.(*tokens.Manager)
		at := clk.Now().UnixNano()
		for _, item := range m.Cache.Items() {
			if item.Object.(*tokens.Token).UsableAt(at) {
				n++
			}
		}
		return true
	})
	return float64(n)
}

// oldestRefreshTokenAge is the age in seconds of the oldest stored refresh
// token over all token managers.
func oldestRefreshTokenAge() float64 {
	var oldest int64
	managers.Range(func(_, v any) bool {
		oldest = max(oldest, v.(*tokens.Manager).OldestRefreshToken.Load())
		return true
	})
	return float64(oldest)
}

// allTokenFailures lists every tokenFailure, up to the first value that
// has no name of its own.
func allTokenFailures() []tokens.TokenFailure {
	var all []tokens.TokenFailure
	for f := tokens.FailNoConsent; f < tokens.FailNoConsent+64; f++ {
		if (&tokens.Error{Failure: f}).Error() == "token error" {
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
		m := v.(*tokens.Manager)
		m.Ledger().Each(func(key string, st tokens.TenantState) {
			switch {
			case !needsReconnect(&st):
			case strings.Contains(key, "/"):
				user++
			default:
				service++
			}
		})
		return true
	})
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(service), "service")
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(user), "user")
}

// needsReconnect says whether a subject's last failure needs a person to
// authorize again. A subject that never had a token (a made-up TenantId,
// a customer who never connected) is not a broken chain.
func needsReconnect(st *tokens.TenantState) bool {
	if st.ConsentRevoked {
		return true
	}
	e := st.LastError
	if e == nil {
		return false
	}
	switch e.Failure {
	case tokens.FailGrantRejected, tokens.FailConsentRevoked, tokens.FailUserMismatch:
		return true
	case tokens.FailTenantMismatch:
		return !e.FromClientCredentials
	case tokens.FailNoConsent, tokens.FailAccountNotAuthorized:
		return !st.Unknown
	}
	return false
}
