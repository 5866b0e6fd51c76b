package fortnox

import (
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/ratelimit"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"go.uber.org/zap"
)

// The hot path's benchmarks. They build the handler without Caddy so that
// they measure the plugin's own work; `go run ./test/bench` measures it
// inside Caddy against a plain reverse_proxy.
//
//	go test -run '^$' -bench 'ServeHTTPCached|TokenLookup|MemoryPerTenant' -benchmem .

// benchHandler is a handler with tokens cached for n tenants.
func benchHandler(tb testing.TB, tenants int, limiter bool) (*Handler, []string) {
	tb.Helper()
	h := &Handler{logger: zap.NewNop(), replayBodyLimit: defaultReplayBodyLimit, pacing: pacer{window: defaultRateWindow, maxWait: time.Second}}
	h.resolver = newTenantResolver(DefaultTenantHeader, nil, false, false)
	h.accountHeader = DefaultAccountHeader
	h.owned = ownedHeaders(DefaultTenantHeader, DefaultAccountHeader)
	h.tokens = tokens.NewManager("http://127.0.0.1:1/token", "bench-client", clk)
	tb.Cleanup(func() { _ = h.tokens.Destruct() })
	h.settings = &tokens.Settings{RefreshBefore: tokens.DefaultRefreshBefore, TokenTimeout: time.Second, Logger: zap.NewNop()}
	h.tokens.Settings.Store(h.settings)
	if limiter {
		// A limit the benchmark never reaches: the cost of the bookkeeping.
		h.pacing.turns = ratelimit.New(25, time.Microsecond, clk)
	}
	ids := make([]string, tenants)
	for i := range ids {
		ids[i] = strconv.Itoa(1000000 + i)
		h.tokens.Store(tokens.Subject{Tenant: ids[i]}, tokens.GrantClientCredentials, &tokens.Answer{AccessToken: "eyJ" + ids[i], Lifetime: time.Hour}, tokens.DefaultRefreshBefore)
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

// discardWriter is a ResponseWriter that keeps nothing, so that a long
// benchmark does not measure a growing recorder.
type discardWriter struct{ header http.Header }

func (w *discardWriter) Header() http.Header         { return w.header }
func (w *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *discardWriter) WriteHeader(int)             {}

// caddyBody stands for the wrapper Caddy puts around every request body
// (its IdleTimeoutReader is on by default; access logs add a lengthReader):
// inside Caddy even a GET's body is not http.NoBody.
type caddyBody struct{ io.ReadCloser }

// benchRequests are GET requests, one per tenant, as Caddy hands them on.
func benchRequests(ids []string) []*http.Request {
	reqs := make([]*http.Request, len(ids))
	for i, id := range ids {
		reqs[i] = httptest.NewRequest(http.MethodGet, "/3/companyinformation", nil)
		reqs[i].Header.Set(DefaultTenantHeader, id)
	}
	return reqs
}

// serveCached runs one request through the handler, restoring what the
// handler consumed (the tenant header, Caddy's body wrapper).
func serveCached(b *testing.B, h *Handler, w http.ResponseWriter, r *http.Request, tenant []string, body io.ReadCloser) {
	r.Header[DefaultTenantHeader] = tenant
	r.Body = body
	if err := h.ServeHTTP(w, r, nopNext{}); err != nil {
		b.Fatal(err)
	}
}

// The whole handler on the cached path: resolve the tenant, wait for the
// limiter (when on), look up the token, rewrite the headers, call next.
func BenchmarkServeHTTPCached(b *testing.B) {
	for _, limiter := range []bool{false, true} {
		b.Run("rate_limit="+map[bool]string{false: "off", true: "on"}[limiter], func(b *testing.B) {
			h, ids := benchHandler(b, 100, limiter)
			reqs := benchRequests(ids)
			w := &discardWriter{header: http.Header{}}
			body := &caddyBody{http.NoBody}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				n := i % len(ids)
				serveCached(b, h, w, reqs[n], ids[n:n+1], body)
			}
		})
	}
}

// The same with every core serving requests, as Caddy does.
func BenchmarkServeHTTPCachedParallel(b *testing.B) {
	for _, limiter := range []bool{false, true} {
		b.Run("rate_limit="+map[bool]string{false: "off", true: "on"}[limiter], func(b *testing.B) {
			h, ids := benchHandler(b, 100, limiter)
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				reqs := benchRequests(ids)
				w := &discardWriter{header: http.Header{}}
				body := &caddyBody{http.NoBody}
				for i := 0; pb.Next(); i++ {
					n := i % len(ids)
					serveCached(b, h, w, reqs[n], ids[n:n+1], body)
				}
			})
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
				if _, err := h.tokens.TokenFor(ctx, tokens.Subject{Tenant: ids[i%n]}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Memory held per cached tenant (a realistic ~3 KB Fortnox token each),
// from the heap in use before and after caching n tokens.
func BenchmarkMemoryPerTenant(b *testing.B) {
	for _, n := range []int{10, 1000, 100000} {
		b.Run(strconv.Itoa(n)+"_tenants", func(b *testing.B) {
			token := strings.Repeat("x", 3000)
			var perTenant float64
			for range b.N {
				m := tokens.NewManager("http://127.0.0.1:1/token", "mem-client", clk)
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				for i := range n {
					id := strconv.Itoa(1000000 + i)
					m.Store(tokens.Subject{Tenant: id}, tokens.GrantClientCredentials, &tokens.Answer{AccessToken: token + id, Lifetime: time.Hour}, tokens.DefaultRefreshBefore)
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				perTenant = float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(n)
				runtime.KeepAlive(m)
				_ = m.Destruct()
			}
			b.ReportMetric(perTenant, "bytes/tenant")
			b.ReportMetric(perTenant-float64(len("Bearer ")+len(token)+7), "bytes/tenant-beyond-token")
		})
	}
}

// The cached path stays cheap inside Caddy, where even a GET's body is
// wrapped: one allocation (the Authorization value), no body buffer.
func TestCachedPathAllocations(t *testing.T) {
	h, ids := benchHandler(t, 10, false)
	reqs := benchRequests(ids)
	w := &discardWriter{header: http.Header{}}
	body := &caddyBody{http.NoBody}
	i := 0
	allocs := testing.AllocsPerRun(200, func() {
		r := reqs[i%len(ids)]
		r.Header[DefaultTenantHeader] = ids[i%len(ids) : i%len(ids)+1]
		r.Body = body
		if err := h.ServeHTTP(w, r, nopNext{}); err != nil {
			t.Fatal(err)
		}
		i++
	})
	if allocs > 1 {
		t.Errorf("%.1f allocations per cached request, want at most 1", allocs)
	}
}
