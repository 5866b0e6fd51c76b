package fortnox

// Tracing under Caddy's own `tracing` directive. Caddy keeps its tracer
// provider to itself, so the plugin takes it from the request's span
// (otelhttp's, which `tracing` starts): with no `tracing` directive, or a
// request that is not sampled, that span is a no-op that does not record,
// and the plugin does no tracing work at all. The cached path never looks:
// its spans would say nothing, and it stays as fast as without tracing.
//
// Spans (children of the request's span): fortnox.token, getting a token
// that was not simply cached, with fortnox.lock, fortnox.store and
// fortnox.token_request under it; fortnox.rate_limit, a wait for the
// tenant's turn (or a refusal); fortnox.replay, the replay after a 401. A
// refresh ahead of expiry that a request started is a root fortnox.token
// span of its own (fortnox.background=true) with a link to that request's
// span. No span or attribute ever holds a token or a secret.

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

	"github.com/caddy-fortnox/caddy-fortnox/internal/ratelimit"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// tracerName is the instrumentation scope of the plugin's spans.
const tracerName = "github.com/caddy-fortnox/caddy-fortnox"

// Span names (DESIGN "What operators see").
const (
	spanRateLimit    = "fortnox.rate_limit"
	spanToken        = "fortnox.token"
	spanLock         = "fortnox.lock"
	spanTokenRequest = "fortnox.token_request"
	spanStore        = "fortnox.store"
	spanReplay       = "fortnox.replay"
)

// Attribute keys.
const (
	attrTenant  = attribute.Key("fortnox.tenant")
	attrAccount = attribute.Key("fortnox.account")
	attrGrant   = attribute.Key("fortnox.grant")
	attrOutcome = attribute.Key("fortnox.outcome")
	// attrOperation says what a fortnox.store span did.
	attrOperation = attribute.Key("fortnox.operation")
	// attrBackground marks the root span of a refresh ahead of expiry.
	attrBackground = attribute.Key("fortnox.background")
	// attrStatus is Fortnox's HTTP status on a fortnox.token_request span
	// (absent when no answer came), by OpenTelemetry's name for it.
	attrStatus = attribute.Key("http.response.status_code")
)

// Outcomes besides "ok" and the error codes of the JSON answers.
const (
	outcomeOK          = "ok"
	outcomeRateLimited = "rate_limited"
	outcomeCancelled   = "cancelled"
	outcomeError       = "error"
)

// Operations of fortnox.store spans.
const (
	opLoadRecord      = "load_record"
	opSaveRecord      = "save_record"
	opLoadSharedToken = "load_shared_token"
	opShareToken      = "share_token"
)

// tspan is one fortnox.* span, or none (tracing off, or the request not
// sampled): then every method does nothing.
type tspan struct{ s trace.Span }

// startSpan starts a child named name of the span in parent, if that span
// is recording; ctx then carries the new span.
func startSpan(parent context.Context, name string, subj subject, opts ...trace.SpanStartOption) (context.Context, tspan) {
	p := trace.SpanFromContext(parent)
	if !p.IsRecording() {
		return parent, tspan{}
	}
	opts = append(opts, trace.WithAttributes(subj.traceAttributes()...))
	ctx, s := p.TracerProvider().Tracer(tracerName).Start(parent, name, opts...)
	return ctx, tspan{s}
}

func (s subject) traceAttributes() []attribute.KeyValue {
	if s.account == "" {
		return []attribute.KeyValue{attrTenant.String(s.tenant)}
	}
	return []attribute.KeyValue{attrTenant.String(s.tenant), attrAccount.String(s.account)}
}

func (t tspan) recording() bool { return t.s != nil && t.s.IsRecording() }

// set adds attributes.
func (t tspan) set(attrs ...attribute.KeyValue) {
	if t.recording() {
		t.s.SetAttributes(attrs...)
	}
}

// end ends the span with outcome (a second end does nothing).
func (t tspan) end(outcome string, opts ...trace.SpanEndOption) {
	if !t.recording() {
		return
	}
	t.s.SetAttributes(attrOutcome.String(outcome))
	if outcome != outcomeOK {
		t.s.SetStatus(codes.Error, outcome)
	}
	t.s.End(opts...)
}

// endErr ends the span with err's outcome ("ok" for nil).
func (t tspan) endErr(err error) {
	if t.recording() {
		t.end(outcomeOf(err))
	}
}

// endToken ends a fortnox.token span with the token's grant, or err.
func (t tspan) endToken(tok *cachedToken, err error) {
	if t.recording() && err == nil && tok != nil {
		t.s.SetAttributes(attrGrant.String(tok.grant))
	}
	t.endErr(err)
}

// endAnswer ends a fortnox.token_request span with Fortnox's status.
func (t tspan) endAnswer(a *tokenAnswer, err error) {
	if !t.recording() {
		return
	}
	var terr *tokenError
	switch {
	case err == nil && a != nil && a.status != 0:
		t.s.SetAttributes(attrStatus.Int(a.status))
	case errors.As(err, &terr) && terr.status != 0:
		t.s.SetAttributes(attrStatus.Int(terr.status))
	}
	t.endErr(err)
}

// link adds a link to the span in ctx (another request's).
func (t tspan) link(ctx context.Context) {
	if sc := trace.SpanContextFromContext(ctx); t.recording() && sc.IsValid() {
		t.s.AddLink(trace.Link{SpanContext: sc})
	}
}

// outcomeOf names what err means for the app: the error code of its JSON
// answer, never the error's text.
func outcomeOf(err error) string {
	var terr *tokenError
	switch {
	case err == nil:
		return outcomeOK
	case errors.As(err, &terr):
		return terr.errorCode()
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return outcomeCancelled
	}
	var rle *ratelimit.Error
	if errors.As(err, &rle) {
		return outcomeRateLimited
	}
	return outcomeError
}

// spanLink is a recording request span to link a background span to.
type spanLink struct {
	tp trace.TracerProvider
	sc trace.SpanContext
}

// linkTo is the span in ctx when it is recording (ok false otherwise).
// It is read while the request runs: once it has ended it records nothing.
func linkTo(ctx context.Context) (spanLink, bool) {
	s := trace.SpanFromContext(ctx)
	if !s.IsRecording() {
		return spanLink{}, false
	}
	return spanLink{tp: s.TracerProvider(), sc: s.SpanContext()}, true
}

// startBackground starts the root span of a refresh ahead of expiry,
// linked to the request that started it.
func (l spanLink) startBackground(subj subject) (context.Context, tspan) {
	ctx, s := l.tp.Tracer(tracerName).Start(context.Background(), spanToken,
		trace.WithNewRoot(), trace.WithLinks(trace.Link{SpanContext: l.sc}),
		trace.WithAttributes(append(subj.traceAttributes(), attrBackground.Bool(true))...))
	return ctx, tspan{s}
}

// flightTraces hands a token flight the span of the request (or
// background refresh) that started it. A flight runs detached from every
// caller (single flight: a caller that gives up does not cancel it), so it
// gets no caller's context; it is keyed by subject, as flights are, and
// the code inside asks for the span of its subject. Untraced flights
// (tracing off, keep-alive, consent events) register nothing, and asking
// costs one atomic load.
type flightTraces struct {
	n     atomic.Int32
	byKey sync.Map // subject key -> context.Context holding a fortnox.token span
}

// begin registers ctx (nil: nothing) as the span context of the flight
// for key, until the returned function is called.
func (f *flightTraces) begin(key string, ctx context.Context) (end func()) {
	if ctx == nil {
		return func() {}
	}
	f.n.Add(1)
	f.byKey.Store(key, ctx)
	return func() {
		f.byKey.CompareAndDelete(key, ctx)
		f.n.Add(-1)
	}
}

// of returns the span context of the flight running for key, or nil.
func (f *flightTraces) of(key string) context.Context {
	if f.n.Load() == 0 {
		return nil
	}
	if v, ok := f.byKey.Load(key); ok {
		return v.(context.Context)
	}
	return nil
}

// childSpan starts a span under the traced flight of subj, if any.
func (m *tokenManager) childSpan(subj subject, name string, opts ...trace.SpanStartOption) tspan {
	parent := m.traces.of(subj.key())
	if parent == nil {
		return tspan{}
	}
	// The flight's span was recording when it was registered. It may have
	// ended since (its request gave up waiting): what the flight does still
	// belongs under it.
	opts = append(opts, trace.WithAttributes(subj.traceAttributes()...))
	_, s := trace.SpanFromContext(parent).TracerProvider().Tracer(tracerName).Start(parent, name, opts...)
	return tspan{s}
}

// storeSpan is a fortnox.store span for op under subj's traced flight.
func (m *tokenManager) storeSpan(subj subject, op string) tspan {
	return m.childSpan(subj, spanStore, trace.WithAttributes(attrOperation.String(op)))
}

// sharedSpan is a span for a call to what the sidecars share: only in
// cluster mode (in one process those calls do nothing).
func (m *tokenManager) sharedSpan(subj subject, name, op string) tspan {
	if m.cluster.Load() == nil {
		return tspan{}
	}
	if op == "" {
		return m.childSpan(subj, name)
	}
	return m.childSpan(subj, name, trace.WithAttributes(attrOperation.String(op)))
}

// tokenSpan starts the fortnox.token span of a caller that waits for a
// token flight; tctx is nil when the caller is not traced.
func tokenSpan(ctx context.Context, subj subject) (tctx context.Context, t tspan) {
	tctx, t = startSpan(ctx, spanToken, subj)
	if !t.recording() {
		return nil, t
	}
	return tctx, t
}

// joined links a caller's fortnox.token span to the flight it joined, when
// another request's (its fortnox.token_request span is there). Best
// effort: a flight whose goroutine has not begun yet is not seen.
func (m *tokenManager) joined(t tspan, key string, own context.Context) {
	if !t.recording() {
		return
	}
	if lead := m.traces.of(key); lead != nil && lead != own {
		t.link(lead)
	}
}
