package fortnox

import (
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

// benchHandler is a handler with tokens cached for n tenants, built without
// Caddy so that the benchmark measures the plugin's own work.
func benchHandler(b *testing.B, tenants int, limiter bool) (*Handler, []string) {
	b.Helper()
	h := &Handler{logger: zap.NewNop(), replayBodyLimit: defaultReplayBodyLimit, rateWindow: defaultRateWindow, maxWait: time.Second}
	h.resolver = newTenantResolver(DefaultTenantHeader, nil, false, false)
	h.tokens = newTokenManager("http://127.0.0.1:1/token", "bench-client")
	b.Cleanup(func() { _ = h.tokens.Destruct() })
	h.settings = &managerSettings{refreshBefore: defaultRefreshBefore, tokenTimeout: time.Second, logger: zap.NewNop()}
	h.tokens.settings.Store(h.settings)
	if limiter {
		// A limit the benchmark never reaches: the cost of the bookkeeping.
		h.limiter = newRateLimiter(25, time.Microsecond)
	}
	ids := make([]string, tenants)
	for i := range ids {
		ids[i] = strconv.Itoa(1000000 + i)
		h.tokens.store(ids[i], grantClientCredentials, &tokenAnswer{accessToken: "eyJ" + ids[i], lifetime: time.Hour}, defaultRefreshBefore)
	}
	return h, ids
}

type nopNext struct{}

func (nopNext) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	if len(r.Header["Authorization"]) != 1 {
		panic("no token")
	}
	w.WriteHeader(http.StatusOK)
	return nil
}

// The whole handler on the cached path: resolve the tenant, wait for the
// limiter (when on), look up the token, rewrite the headers, call next.
func BenchmarkServeHTTPCached(b *testing.B) {
	for _, limiter := range []bool{false, true} {
		b.Run("rate_limit="+map[bool]string{false: "off", true: "on"}[limiter], func(b *testing.B) {
			h, ids := benchHandler(b, 100, limiter)
			w := httptest.NewRecorder()
			reqs := make([]*http.Request, len(ids))
			for i, id := range ids {
				reqs[i] = httptest.NewRequest(http.MethodGet, "/3/companyinformation", nil)
				reqs[i].Header.Set(DefaultTenantHeader, id)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				r := reqs[i%len(reqs)]
				r.Header[DefaultTenantHeader] = ids[i%len(ids) : i%len(ids)+1]
				if err := h.ServeHTTP(w, r, nopNext{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Token lookup alone, at several tenant counts.
func BenchmarkTokenLookup(b *testing.B) {
	for _, n := range []int{10, 1000, 100000} {
		b.Run(strconv.Itoa(n)+"_tenants", func(b *testing.B) {
			h, ids := benchHandler(b, n, false)
			ctx := httptest.NewRequest(http.MethodGet, "/", nil).Context()
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := h.tokens.tokenFor(ctx, ids[i%n]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Memory held per cached tenant (a realistic ~3 KB Fortnox token each).
func BenchmarkMemoryPerTenant(b *testing.B) {
	for _, n := range []int{1000, 100000} {
		b.Run(strconv.Itoa(n)+"_tenants", func(b *testing.B) {
			token := strings.Repeat("x", 3000)
			var perTenant float64
			for range b.N {
				m := newTokenManager("http://127.0.0.1:1/token", "mem-client")
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				for i := range n {
					id := strconv.Itoa(1000000 + i)
					m.store(id, grantClientCredentials, &tokenAnswer{accessToken: token + id, lifetime: time.Hour}, defaultRefreshBefore)
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				perTenant = float64(after.HeapAlloc-before.HeapAlloc) / float64(n)
				runtime.KeepAlive(m)
				_ = m.Destruct()
			}
			b.ReportMetric(perTenant, "bytes/tenant")
		})
	}
}
