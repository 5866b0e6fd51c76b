package fortnox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/logscan"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// Caddy's `tracing` directive builds its tracer provider from the
// environment (autoexport): OTEL_TRACES_EXPORTER=fortnox-test picks this
// in-memory exporter, so the tests read the spans a real Caddy exported.
var traceSink = &keptExporter{tracetest.NewInMemoryExporter()}

func init() {
	autoexport.RegisterSpanExporter("fortnox-test", func(context.Context) (sdktrace.SpanExporter, error) {
		return traceSink, nil
	})
}

// keptExporter keeps its spans when Caddy shuts its provider down (a config
// reload or a test's end), unlike the in-memory exporter itself.
type keptExporter struct{ *tracetest.InMemoryExporter }

func (keptExporter) Shutdown(context.Context) error { return nil }

// startTracedSidecar is startSidecar with Caddy's `tracing` directive in
// the site, exporting to traceSink.
func startTracedSidecar(t *testing.T, fake *fakefortnox.Server, options string) *sidecar {
	t.Helper()
	t.Setenv("OTEL_TRACES_EXPORTER", "fortnox-test")
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "10") // milliseconds: export at once
	traceSink.Reset()
	s := startSidecar(t, fake, options)
	caddyfile := strings.Replace(s.caddyfile(), "\tfortnox {", "\ttracing {\n\t\tspan fortnox_test\n\t}\n\tfortnox {", 1)
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading the config with tracing: %v", err)
	}
	s.client.CloseIdleConnections()
	return s
}

// tracedGet sends a GET as part of a new trace (its traceparent header
// names a remote parent) and returns the trace's ID with the answer.
func (s *sidecar) tracedGet(path, tenant string) (int, []byte, trace.TraceID) {
	s.t.Helper()
	return s.tracedGetWith(path, tenant, http.Header{})
}

// tracedGetWith is tracedGet with more request headers.
func (s *sidecar) tracedGetWith(path, tenant string, h http.Header) (int, []byte, trace.TraceID) {
	s.t.Helper()
	var tid trace.TraceID
	var sid trace.SpanID
	_, _ = rand.Read(tid[:])
	_, _ = rand.Read(sid[:])
	h.Set("Traceparent", "00-"+hex.EncodeToString(tid[:])+"-"+hex.EncodeToString(sid[:])+"-01")
	status, body, _ := s.do(http.MethodGet, path, tenant, nil, h)
	return status, body, tid
}

// traceSpans waits for the trace's server span (it ends last) and returns
// every span of the trace.
func traceSpans(t *testing.T, tid trace.TraceID) tracetest.SpanStubs {
	t.Helper()
	var out tracetest.SpanStubs
	eventually(t, 10*time.Second, "the request's span to be exported", func() bool {
		out = out[:0]
		server := false
		for _, s := range traceSink.GetSpans() {
			if s.SpanContext.TraceID() == tid {
				out = append(out, s)
				server = server || s.SpanKind == trace.SpanKindServer
			}
		}
		return server
	})
	return out
}

// named returns the spans called name.
func named(spans tracetest.SpanStubs, name string) tracetest.SpanStubs {
	var out tracetest.SpanStubs
	for _, s := range spans {
		if s.Name == name {
			out = append(out, s)
		}
	}
	return out
}

// only returns the one span called name, failing when there are more or none.
func only(t *testing.T, spans tracetest.SpanStubs, name string) tracetest.SpanStub {
	t.Helper()
	found := named(spans, name)
	if len(found) != 1 {
		t.Fatalf("%d %s spans, want 1; spans: %s", len(found), name, spanNames(spans))
	}
	return found[0]
}

func spanNames(spans tracetest.SpanStubs) string {
	var names []string
	for _, s := range spans {
		names = append(names, s.Name)
	}
	return strings.Join(names, ", ")
}

func serverSpan(t *testing.T, spans tracetest.SpanStubs) tracetest.SpanStub {
	t.Helper()
	for _, s := range spans {
		if s.SpanKind == trace.SpanKindServer {
			return s
		}
	}
	t.Fatal("no server span")
	return tracetest.SpanStub{}
}

// attr returns the span's attribute key as a string ("" when absent).
func attr(s tracetest.SpanStub, key attribute.Key) string {
	for _, kv := range s.Attributes {
		if kv.Key == key {
			return kv.Value.Emit()
		}
	}
	return ""
}

// wantAttrs checks attributes of a span.
func wantAttrs(t *testing.T, s tracetest.SpanStub, want map[attribute.Key]string) {
	t.Helper()
	for k, v := range want {
		if got := attr(s, k); got != v {
			t.Errorf("%s: %s = %q, want %q (attributes %v)", s.Name, k, got, v, s.Attributes)
		}
	}
}

// wantParent checks that child is a child span of parent.
func wantParent(t *testing.T, child, parent tracetest.SpanStub) {
	t.Helper()
	if child.Parent.SpanID() != parent.SpanContext.SpanID() {
		t.Errorf("%s's parent is %s, want %s (%s)", child.Name, child.Parent.SpanID(), parent.SpanContext.SpanID(), parent.Name)
	}
}

// noSecretsInSpans fails when any span attribute, event or link holds a
// token or the client secret.
func noSecretsInSpans(t *testing.T) {
	t.Helper()
	patterns := logscan.Patterns(testClientSecret)
	for _, s := range traceSink.GetSpans() {
		text := fmt.Sprint(s.Name, s.Attributes, s.Events, s.Links, s.Status)
		for _, p := range patterns {
			if p.MatchString(text) {
				t.Errorf("span %s holds a token or secret (%s): %.300s", s.Name, p, text)
			}
		}
	}
}

// A request that needs a new token shows where its time went: a
// fortnox.token span under the request's span, and under it the call to
// the token endpoint with the grant and Fortnox's status. A request served
// from the cache shows none.
func TestTracingColdAndCachedToken(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startTracedSidecar(t, fake, "")

	status, body, tid := sc.tracedGet("/3/companyinformation", "1234567")
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	spans := traceSpans(t, tid)
	token := only(t, spans, tokens.SpanToken)
	wantParent(t, token, serverSpan(t, spans))
	wantAttrs(t, token, map[attribute.Key]string{tokens.AttrTenant: "1234567", tokens.AttrGrant: tokens.GrantClientCredentials.String(), tokens.AttrOutcome: "ok", tokens.AttrAccount: ""})
	request := only(t, spans, tokens.SpanTokenRequest)
	wantParent(t, request, token)
	wantAttrs(t, request, map[attribute.Key]string{tokens.AttrTenant: "1234567", tokens.AttrGrant: tokens.GrantClientCredentials.String(), tokens.AttrStatus: "200", tokens.AttrOutcome: "ok"})
	if !request.StartTime.Before(request.EndTime) || request.StartTime.Before(token.StartTime) || request.EndTime.After(token.EndTime) {
		t.Errorf("the token request (%v to %v) is not within the token span (%v to %v)", request.StartTime, request.EndTime, token.StartTime, token.EndTime)
	}
	if n := len(named(spans, tokens.SpanRateLimit)); n != 0 {
		t.Errorf("%d rate-limit spans for a request that did not wait", n)
	}

	status, _, tid = sc.tracedGet("/3/companyinformation", "1234567")
	if status != http.StatusOK {
		t.Fatal(status)
	}
	spans = traceSpans(t, tid)
	for _, s := range spans {
		if strings.HasPrefix(s.Name, "fortnox.") {
			t.Errorf("a cached token's request has a %s span", s.Name)
		}
	}
	noSecretsInSpans(t)
}

// A token endpoint that refuses shows the refusal: the outcome is the
// error code the app got, and the status Fortnox answered.
func TestTracingRefusedToken(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startTracedSidecar(t, fake, "")
	status, _, tid := sc.tracedGet("/3/companyinformation", "1234567")
	if status != http.StatusForbidden {
		t.Fatalf("status %d, want 403", status)
	}
	spans := traceSpans(t, tid)
	token := only(t, spans, tokens.SpanToken)
	wantAttrs(t, token, map[attribute.Key]string{tokens.AttrOutcome: "tenant_not_authorized", tokens.AttrGrant: ""})
	request := only(t, spans, tokens.SpanTokenRequest)
	wantAttrs(t, request, map[attribute.Key]string{tokens.AttrGrant: tokens.GrantClientCredentials.String(), tokens.AttrOutcome: "tenant_not_authorized"})
	if got := attr(request, tokens.AttrStatus); got == "" || got[0] != '4' {
		t.Errorf("Fortnox's status on the token request: %q, want its 4xx", got)
	}
}

// A tenant on its refresh token: the store reads and writes, the storage
// lock, and the refresh-token request are all under the request's
// fortnox.token span.
func TestTracingRefreshTokenPath(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1, TokenLifetime: time.Hour})
	sc := startTracedSidecar(t, fake, "")
	// Storing the refresh token spends it once: the access token that
	// came with it is stored too. Past its refresh time, the request
	// refreshes again, under the lock.
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	advance(fake, 56*time.Minute)
	status, body, tid := sc.tracedGet("/3/companyinformation", "1234567")
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	spans := traceSpans(t, tid)
	token := only(t, spans, tokens.SpanToken)
	wantAttrs(t, token, map[attribute.Key]string{tokens.AttrGrant: tokens.GrantRefreshToken.String(), tokens.AttrOutcome: "ok"})
	var grants []string
	for _, s := range named(spans, tokens.SpanTokenRequest) {
		wantParent(t, s, token)
		grants = append(grants, attr(s, tokens.AttrGrant)+"="+attr(s, tokens.AttrOutcome)+"/"+attr(s, tokens.AttrStatus))
	}
	// Client credentials first (no consent), then the refresh token.
	if want := []string{"client_credentials=tenant_not_authorized/", "refresh_token=ok/200"}; len(grants) != 2 || grants[1] != want[1] || !strings.HasPrefix(grants[0], want[0]) {
		t.Errorf("token requests %v, want %v (with Fortnox's 4xx)", grants, want)
	}
	lock := only(t, spans, tokens.SpanLock)
	wantParent(t, lock, token)
	wantAttrs(t, lock, map[attribute.Key]string{tokens.AttrTenant: "1234567", tokens.AttrOutcome: "ok"})
	var ops []string
	for _, s := range named(spans, tokens.SpanStore) {
		wantParent(t, s, token)
		if attr(s, tokens.AttrOutcome) != "ok" {
			t.Errorf("store %s: outcome %s", attr(s, tokens.AttrOperation), attr(s, tokens.AttrOutcome))
		}
		ops = append(ops, attr(s, tokens.AttrOperation))
	}
	for _, op := range []string{tokens.OpLoadRecord, tokens.OpSaveRecord} {
		if !slices.Contains(ops, op) {
			t.Errorf("store operations %v: no %s", ops, op)
		}
	}

	// A named account's spans name it.
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	advance(fake, 61*time.Minute) // the access token that came with it has expired
	status, body, tid = sc.tracedGetWith("/3/companyinformation", "1234567", http.Header{DefaultAccountHeader: {"anna"}})
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	spans = traceSpans(t, tid)
	wantAttrs(t, only(t, spans, tokens.SpanToken), map[attribute.Key]string{tokens.AttrTenant: "1234567", tokens.AttrAccount: "anna", tokens.AttrGrant: tokens.GrantRefreshToken.String(), tokens.AttrOutcome: "ok"})
	for _, s := range named(spans, tokens.SpanStore) {
		wantAttrs(t, s, map[attribute.Key]string{tokens.AttrTenant: "1234567", tokens.AttrAccount: "anna"})
	}
	noSecretsInSpans(t)
}

// A request that waits for the tenant's turn shows the wait; one refused
// because the wait would pass max_wait shows the refusal.
func TestTracingRateLimitWait(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	// A window long enough that the second request waits even on a
	// loaded machine.
	sc := startTracedSidecar(t, fake, "rate_limit 1 3s\nmax_wait 5s")
	if status, _, _ := sc.tracedGet("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatal(status)
	}
	status, _, tid := sc.tracedGet("/3/companyinformation", "1234567")
	if status != http.StatusOK {
		t.Fatal(status)
	}
	spans := traceSpans(t, tid)
	wait := only(t, spans, tokens.SpanRateLimit)
	wantParent(t, wait, serverSpan(t, spans))
	wantAttrs(t, wait, map[attribute.Key]string{tokens.AttrTenant: "1234567", tokens.AttrOutcome: "ok"})
	if d := wait.EndTime.Sub(wait.StartTime); d <= 0 || d > 3500*time.Millisecond {
		t.Errorf("the wait span lasted %v, want up to the window (3s)", d)
	}

	// A window longer than max_wait: refused at once.
	sc2 := startTracedSidecar(t, startFakeWithConsent(t), "rate_limit 1 10s\nmax_wait 1s")
	sc2.tracedGet("/3/companyinformation", "1234567")
	status, _, tid = sc2.tracedGet("/3/companyinformation", "1234567")
	if status != http.StatusTooManyRequests {
		t.Fatalf("status %d, want 429", status)
	}
	wantAttrs(t, only(t, traceSpans(t, tid), tokens.SpanRateLimit), map[attribute.Key]string{tokens.AttrOutcome: tokens.OutcomeRateLimited})
}

func startFakeWithConsent(t *testing.T) *fakefortnox.Server {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	return fake
}

// A 401 from Fortnox is replayed with a new token: the replay is a span of
// its own, with the new token's span under it.
func TestTracingReplayAfter401(t *testing.T) {
	fake := startFakeWithConsent(t)
	sc := startTracedSidecar(t, fake, "")
	if status, _, _ := sc.tracedGet("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatal(status)
	}
	advance(fake, tokens.FreshTokenGrace)
	fake.RevokeAccessTokens(testClientID, "1234567")
	status, body, tid := sc.tracedGet("/3/companyinformation", "1234567")
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	spans := traceSpans(t, tid)
	replay := only(t, spans, tokens.SpanReplay)
	wantParent(t, replay, serverSpan(t, spans))
	wantAttrs(t, replay, map[attribute.Key]string{tokens.AttrTenant: "1234567", tokens.AttrOutcome: "ok"})
	token := only(t, spans, tokens.SpanToken)
	wantParent(t, token, replay)
	wantAttrs(t, token, map[attribute.Key]string{tokens.AttrOutcome: "ok", tokens.AttrGrant: tokens.GrantClientCredentials.String()})
	wantParent(t, only(t, spans, tokens.SpanTokenRequest), token)
	noSecretsInSpans(t)
}

// A refresh ahead of expiry that a request started runs in the background
// as a root span of its own, linked to that request's span; the request
// itself, served from the cache, has no token span.
func TestTracingRefreshAheadIsLinked(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1, TokenLifetime: time.Hour})
	fake.GrantConsent(testClientID, "1234567")
	sc := startTracedSidecar(t, fake, "")
	if status, _, _ := sc.tracedGet("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatal(status)
	}
	advance(fake, 56*time.Minute) // past the refresh time (55 min at the latest), before expiry
	status, _, tid := sc.tracedGet("/3/companyinformation", "1234567")
	if status != http.StatusOK {
		t.Fatal(status)
	}
	spans := traceSpans(t, tid)
	if n := len(named(spans, tokens.SpanToken)); n != 0 {
		t.Errorf("the request that started the refresh has %d token spans; the refresh is not its own", n)
	}
	req := serverSpan(t, spans)
	var bg tracetest.SpanStub
	eventually(t, 10*time.Second, "the background refresh's span", func() bool {
		for _, s := range named(traceSink.GetSpans(), tokens.SpanToken) {
			if len(s.Links) == 1 && s.Links[0].SpanContext.SpanID() == req.SpanContext.SpanID() {
				bg = s
				return true
			}
		}
		return false
	})
	if bg.Parent.IsValid() || bg.SpanContext.TraceID() == tid {
		t.Errorf("the background refresh is not a root span of its own trace (parent %v)", bg.Parent.SpanID())
	}
	wantAttrs(t, bg, map[attribute.Key]string{tokens.AttrBackground: "true", tokens.AttrTenant: "1234567", tokens.AttrOutcome: "ok", tokens.AttrGrant: tokens.GrantClientCredentials.String()})
	var requests tracetest.SpanStubs
	eventually(t, 10*time.Second, "the background refresh's token request span", func() bool {
		requests = nil
		for _, s := range named(traceSink.GetSpans(), tokens.SpanTokenRequest) {
			if s.Parent.SpanID() == bg.SpanContext.SpanID() {
				requests = append(requests, s)
			}
		}
		return len(requests) == 1
	})
	wantAttrs(t, requests[0], map[attribute.Key]string{tokens.AttrGrant: tokens.GrantClientCredentials.String(), tokens.AttrStatus: "200"})
	noSecretsInSpans(t)
}

// In cluster mode the calls to Redis on the request's path show too: the
// look for a token another sidecar shared, the subject's lock, and the
// sharing of the new token.
func TestTracingClusterMode(t *testing.T) {
	fake := startFakeWithConsent(t)
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	t.Setenv("FORTNOX_TEST_REDIS_URL", "redis://"+addr+"/0")
	sc := startTracedSidecar(t, fake, "redis {env.FORTNOX_TEST_REDIS_URL}")
	status, body, tid := sc.tracedGet("/3/companyinformation", "1234567")
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	spans := traceSpans(t, tid)
	token := only(t, spans, tokens.SpanToken)
	lock := only(t, spans, tokens.SpanLock)
	wantParent(t, lock, token)
	wantAttrs(t, lock, map[attribute.Key]string{tokens.AttrTenant: "1234567", tokens.AttrOutcome: "ok"})
	var ops []string
	for _, s := range named(spans, tokens.SpanStore) {
		wantParent(t, s, token)
		ops = append(ops, attr(s, tokens.AttrOperation)+"="+attr(s, tokens.AttrOutcome))
	}
	for _, op := range []string{tokens.OpLoadSharedToken + "=ok", tokens.OpShareToken + "=ok"} {
		if !slices.Contains(ops, op) {
			t.Errorf("store operations %v: no %s", ops, op)
		}
	}
	wantAttrs(t, only(t, spans, tokens.SpanTokenRequest), map[attribute.Key]string{tokens.AttrStatus: "200", tokens.AttrOutcome: "ok"})
	noSecretsInSpans(t)
}

// tracedRequests are benchRequests whose context holds a recording request
// span, as under Caddy's `tracing` directive.
func tracedRequests(tb testing.TB, ids []string) []*http.Request {
	tp := sdktrace.NewTracerProvider()
	tb.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	ctx, span := tp.Tracer("test").Start(context.Background(), "request")
	tb.Cleanup(func() { span.End() })
	reqs := benchRequests(ids)
	for i, r := range reqs {
		reqs[i] = r.WithContext(ctx)
	}
	return reqs
}

// With tracing on, a request served from the cache (and not waiting for
// its turn) costs what it costs with tracing off: the plugin makes no span
// for it and does not look.
func TestCachedPathAllocationsTraced(t *testing.T) {
	h, ids := benchHandler(t, 10, true)
	reqs := tracedRequests(t, ids)
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
		t.Errorf("%.1f allocations per cached request with tracing on, want at most 1", allocs)
	}
}

// The cached path with the request span recording (compare with
// BenchmarkServeHTTPCached).
func BenchmarkServeHTTPCachedTraced(b *testing.B) {
	h, ids := benchHandler(b, 100, false)
	reqs := tracedRequests(b, ids)
	w := &discardWriter{header: http.Header{}}
	body := &caddyBody{http.NoBody}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		n := i % len(ids)
		serveCached(b, h, w, reqs[n], ids[n:n+1], body)
	}
}

// One token request serves every request that needs the tenant's token
// at once. Its span stays under the fortnox.token span of the request that
// started it, even when that request gave up before the answer came; a
// request that joined links to that span.
func TestTracingSingleFlight(t *testing.T) {
	fake := startFakeWithConsent(t)
	fake.SetFault(fakefortnox.Fault{Delay: 1500 * time.Millisecond})
	sc := startTracedSidecar(t, fake, "")

	// The first request leaves after 300 ms; the token request goes on.
	var first trace.TraceID
	_, _ = rand.Read(first[:])
	req, _ := http.NewRequest(http.MethodGet, sc.url+"/3/companyinformation", nil)
	req.Header.Set(DefaultTenantHeader, "1234567")
	req.Header.Set("Traceparent", "00-"+hex.EncodeToString(first[:])+"-00f067aa0ba902b7-01")
	joined := make(chan trace.TraceID)
	go func() {
		time.Sleep(100 * time.Millisecond)
		status, _, tid := sc.tracedGet("/3/companyinformation", "1234567")
		if status != http.StatusOK {
			t.Errorf("the request that joined: status %d", status)
		}
		joined <- tid
	}()
	if _, err := (&http.Client{Timeout: 300 * time.Millisecond}).Do(req); err == nil {
		t.Fatal("the first request did not time out")
	}
	second := <-joined

	leader := only(t, traceSpans(t, first), tokens.SpanToken)
	wantAttrs(t, leader, map[attribute.Key]string{tokens.AttrOutcome: tokens.OutcomeCancelled})
	follower := only(t, traceSpans(t, second), tokens.SpanToken)
	wantAttrs(t, follower, map[attribute.Key]string{tokens.AttrOutcome: "ok", tokens.AttrGrant: tokens.GrantClientCredentials.String()})
	if len(follower.Links) != 1 || follower.Links[0].SpanContext.SpanID() != leader.SpanContext.SpanID() {
		t.Errorf("the joining request's token span links to %v, want the first request's token span", follower.Links)
	}
	if n := len(named(traceSpans(t, second), tokens.SpanTokenRequest)); n != 0 {
		t.Errorf("the joining request has %d token request spans of its own", n)
	}
	var request tracetest.SpanStub
	eventually(t, 10*time.Second, "the token request's span", func() bool {
		found := named(traceSink.GetSpans(), tokens.SpanTokenRequest)
		if len(found) == 1 {
			request = found[0]
		}
		return len(found) == 1
	})
	wantParent(t, request, leader)
	wantAttrs(t, request, map[attribute.Key]string{tokens.AttrOutcome: "ok", tokens.AttrStatus: "200"})
	if n := fake.TokenRequests("", ""); n != 1 {
		t.Errorf("%d token requests, want 1", n)
	}
}
