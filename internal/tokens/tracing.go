package tokens

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
	SpanRateLimit    = "fortnox.rate_limit"
	SpanToken        = "fortnox.token"
	SpanLock         = "fortnox.lock"
	SpanTokenRequest = "fortnox.token_request"
	SpanStore        = "fortnox.store"
	SpanReplay       = "fortnox.replay"
)

// Attribute keys.
const (
	AttrTenant  = attribute.Key("fortnox.tenant")
	AttrAccount = attribute.Key("fortnox.account")
	AttrGrant   = attribute.Key("fortnox.grant")
	AttrOutcome = attribute.Key("fortnox.outcome")
	// attrOperation says what a fortnox.store span did.
	AttrOperation = attribute.Key("fortnox.operation")
	// attrBackground marks the root span of a refresh ahead of expiry.
	AttrBackground = attribute.Key("fortnox.background")
	// attrStatus is Fortnox's HTTP status on a fortnox.token_request span
	// (absent when no answer came), by OpenTelemetry's name for it.
	AttrStatus = attribute.Key("http.response.status_code")
)

// Outcomes besides "ok" and the error codes of the JSON answers.
const (
	outcomeOK          = "ok"
	OutcomeRateLimited = "rate_limited"
	OutcomeCancelled   = "cancelled"
	outcomeError       = "error"
)

// Operations of fortnox.store spans.
const (
	OpLoadRecord      = "load_record"
	OpSaveRecord      = "save_record"
	OpLoadSharedToken = "load_shared_token"
	OpShareToken      = "share_token"
)

// tspan is one fortnox.* span, or none (tracing off, or the request not
// sampled): then every method does nothing.
type tspan struct{ s trace.Span }

// StartSpan starts a child named name of the span in parent, if that span
// is recording; ctx then carries the new span.
func StartSpan(parent context.Context, name string, subj Subject, opts ...trace.SpanStartOption) (context.Context, tspan) {
	p := trace.SpanFromContext(parent)
	if !p.IsRecording() {
		return parent, tspan{}
	}
	opts = append(opts, trace.WithAttributes(subj.traceAttributes()...))
	ctx, s := p.TracerProvider().Tracer(tracerName).Start(parent, name, opts...)
	return ctx, tspan{s}
}

func (s Subject) traceAttributes() []attribute.KeyValue {
	if s.Account == "" {
		return []attribute.KeyValue{AttrTenant.String(s.Tenant)}
	}
	return []attribute.KeyValue{AttrTenant.String(s.Tenant), AttrAccount.String(s.Account)}
}

func (t tspan) Recording() bool { return t.s != nil && t.s.IsRecording() }

// set adds attributes.
func (t tspan) set(attrs ...attribute.KeyValue) {
	if t.Recording() {
		t.s.SetAttributes(attrs...)
	}
}

// End ends the span with outcome (a second end does nothing).
func (t tspan) End(outcome string, opts ...trace.SpanEndOption) {
	if !t.Recording() {
		return
	}
	t.s.SetAttributes(AttrOutcome.String(outcome))
	if outcome != outcomeOK {
		t.s.SetStatus(codes.Error, outcome)
	}
	t.s.End(opts...)
}

// EndErr ends the span with err's outcome ("ok" for nil).
func (t tspan) EndErr(err error) {
	if t.Recording() {
		t.End(outcomeOf(err))
	}
}

// endToken ends a fortnox.token span with the token's grant, or err.
func (t tspan) endToken(tok *Token, err error) {
	if t.Recording() && err == nil && tok != nil {
		t.s.SetAttributes(AttrGrant.String(string(tok.grant)))
	}
	t.EndErr(err)
}

// endAnswer ends a fortnox.token_request span with Fortnox's status.
func (t tspan) endAnswer(a *Answer, err error) {
	if !t.Recording() {
		return
	}
	var terr *Error
	switch {
	case err == nil && a != nil && a.status != 0:
		t.s.SetAttributes(AttrStatus.Int(a.status))
	case errors.As(err, &terr) && terr.Status != 0:
		t.s.SetAttributes(AttrStatus.Int(terr.Status))
	}
	t.EndErr(err)
}

// link adds a link to the span in ctx (another request's).
func (t tspan) link(ctx context.Context) {
	if sc := trace.SpanContextFromContext(ctx); t.Recording() && sc.IsValid() {
		t.s.AddLink(trace.Link{SpanContext: sc})
	}
}

// outcomeOf names what err means for the app: the error code of its JSON
// answer, never the error's text.
func outcomeOf(err error) string {
	var terr *Error
	switch {
	case err == nil:
		return outcomeOK
	case errors.As(err, &terr):
		return terr.ErrorCode()
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return OutcomeCancelled
	}
	var rle *ratelimit.Error
	if errors.As(err, &rle) {
		return OutcomeRateLimited
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
func (l spanLink) startBackground(subj Subject) (context.Context, tspan) {
	ctx, s := l.tp.Tracer(tracerName).Start(context.Background(), SpanToken,
		trace.WithNewRoot(), trace.WithLinks(trace.Link{SpanContext: l.sc}),
		trace.WithAttributes(append(subj.traceAttributes(), AttrBackground.Bool(true))...))
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

// tracer starts the manager's spans below the request's.
type tracer struct{ m *Manager }

// childSpan starts a span under the traced flight of subj, if any.
func (tr tracer) childSpan(subj Subject, name string, opts ...trace.SpanStartOption) tspan {
	m := tr.m
	parent := m.traces.of(subj.Key())
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
func (tr tracer) storeSpan(subj Subject, op string) tspan {
	return tr.childSpan(subj, SpanStore, trace.WithAttributes(AttrOperation.String(op)))
}

// sharedSpan is a span for a call to what the sidecars share: only in
// cluster mode (in one process those calls do nothing).
func (tr tracer) sharedSpan(subj Subject, name, op string) tspan {
	m := tr.m
	if m.Cluster.Load() == nil {
		return tspan{}
	}
	if op == "" {
		return tr.childSpan(subj, name)
	}
	return tr.childSpan(subj, name, trace.WithAttributes(AttrOperation.String(op)))
}

// tokenSpan starts the fortnox.token span of a caller that waits for a
// token flight; tctx is nil when the caller is not traced.
func tokenSpan(ctx context.Context, subj Subject) (tctx context.Context, t tspan) {
	tctx, t = StartSpan(ctx, SpanToken, subj)
	if !t.Recording() {
		return nil, t
	}
	return tctx, t
}

// joined links a caller's fortnox.token span to the flight it joined, when
// another request's (its fortnox.token_request span is there). Best
// effort: a flight whose goroutine has not begun yet is not seen.
func (tr tracer) joined(t tspan, key string, own context.Context) {
	m := tr.m
	if !t.Recording() {
		return
	}
	if lead := m.traces.of(key); lead != nil && lead != own {
		t.link(lead)
	}
}
