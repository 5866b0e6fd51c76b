package fortnox

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// ServeHTTP resolves the tenant (and account), gets its token, waits for
// the tenant's turn in the rate limiter with the token in hand, puts the
// token on the request and hands it to the next handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	subj, rerr := h.resolveSubject(r)
	if rerr != nil {
		tokens.CountRefusal(rerr.code)
		h.tokens.RefusalLog.Write(h.logger, zapcore.DebugLevel, rerr.code, "request refused", zap.String("error", rerr.code), zap.Int("status", rerr.status))
		writeAppError(w, rerr.status, rerr.code, rerr.message, 0)
		return nil
	}
	if h.tokens.Settings.Load() != h.settings {
		h.tokens.Adopt(h.settings) // the first request of a newly loaded config
	}
	tok, err := h.tokens.TokenFor(r.Context(), subj)
	if err != nil {
		h.writeTokenError(w, r, subj, err)
		return nil
	}
	if h.pacing.turns != nil {
		if tok, err = h.turnWithToken(w, r, subj, tok); tok == nil {
			if err != nil {
				h.writeTokenError(w, r, subj, err)
			}
			return nil
		}
	}
	h.ownHeaders(r, subj)
	r.Header["Authorization"] = []string{tok.Bearer}
	return h.proxy(w, r, next, subj, tok)
}

// resolveSubject picks the tenant and, when the account header is sent,
// the named account.
func (h *Handler) resolveSubject(r *http.Request) (tokens.Subject, *resolveError) {
	tenant, rerr := h.resolver.resolve(r)
	if rerr != nil {
		return tokens.Subject{}, rerr
	}
	values := r.Header[h.accountHeader]
	switch {
	case len(values) == 0:
		return tokens.Subject{Tenant: tenant}, nil
	case len(values) > 1:
		return tokens.Subject{}, &resolveError{http.StatusBadRequest, "ambiguous_account",
			"The request has more than one " + h.accountHeader + " header. Send at most one: the name of a user account of the tenant."}
	case !tokens.ValidAccountName(values[0]):
		return tokens.Subject{}, &resolveError{http.StatusBadRequest, "invalid_account",
			"The " + h.accountHeader + " header is not an account name: 1 to 64 of A-Z a-z 0-9 . _ @ -, not dots only (names are case-sensitive). Leave it out to use the service account."}
	}
	return tokens.Subject{Tenant: tenant, Account: values[0]}, nil
}

// turnWithToken takes the tenant's turn in the rate limiter. The token was
// got first, so that requests waiting for a token do not spend turns; if
// the wait outlived the token, it is got again. It returns nil (and has
// answered, unless err is set) when the request cannot go.
func (h *Handler) turnWithToken(w http.ResponseWriter, r *http.Request, subj tokens.Subject, tok *tokens.Token) (*tokens.Token, error) {
	waited, ok := h.pacing.waitTurn(w, r, subj.Tenant)
	if !ok {
		return nil, nil
	}
	if (waited == 0 || tok.UsableAt(clk.Now().UnixNano())) && !tok.Dropped() {
		return tok, nil // no wait: the token was usable a moment ago
	}
	// The wait outlived the token, or it was dropped meanwhile (another
	// sidecar's event, or the turn found the tenant's shared state changed).
	return h.tokens.TokenFor(r.Context(), subj)
}

// writeTokenError answers a request for which no token could be had. The
// failure itself was logged once by the token manager.
func (h *Handler) writeTokenError(w http.ResponseWriter, r *http.Request, subj tokens.Subject, err error) {
	var terr *tokens.Error
	if !errors.As(err, &terr) {
		// The caller's own context ended while it waited: the client left
		// or its deadline passed. 503 so a proxy in front can retry.
		if r.Context().Err() != nil {
			tokens.CountRefusal("token_wait_cancelled")
			writeAppError(w, http.StatusServiceUnavailable, "token_wait_cancelled",
				"The request ended while it waited for a token for "+subj.String()+".", time.Second)
			return
		}
		terr = tokens.AsTokenError(err)
	}
	terr = tokens.WithAccount(terr, subj)
	tokens.CountRefusal(terr.ErrorCode())
	var retry time.Duration
	if terr.HttpStatus() == http.StatusServiceUnavailable {
		retry = time.Duration(tokens.RetryAfterSeconds(terr.RetryAt, clk.Now())) * time.Second
	}
	writeAppError(w, terr.HttpStatus(), terr.ErrorCode(), terr.Advice(subj.Tenant), retry)
}

// Fortnox's own rate-limit window: the least an app is told to wait after
// Fortnox answered 429, whatever our limiter is set to.
const fortnoxWindow = 5 * time.Second

// proxy hands the request to the next handler (reverse_proxy) and watches
// Fortnox's answer. A 401 means the token was revoked or expired early:
// the subject's token is dropped and, when the body could be kept, the
// request is sent once more with a new token (and a new turn in the rate
// limiter: it is a second request to Fortnox), invisibly to the app. A 429
// slows the tenant's limiter down and tells the app when to come back.
func (h *Handler) proxy(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, subj tokens.Subject, tok *tokens.Token) error {
	body, replayable, err := h.keepBody(r)
	if err != nil {
		return caddyhttp.Error(http.StatusBadRequest, err)
	}
	h.ownTrailers(r)
	uw := getUpstreamWriter(w, h, subj, tok, replayable)
	defer putUpstreamWriter(uw)
	if err := next.ServeHTTP(uw, r); err != nil || !uw.held {
		countProxyError(uw, err)
		return err
	}

	// Fortnox answered 401 and the answer was held back: replay once.
	uw.restoreHeaders()
	rctx, span := tokens.StartSpan(r.Context(), tokens.SpanReplay, subj)
	if span.Recording() {
		r = r.WithContext(rctx) // the replay's token and turn are its children
	}
	fresh, err := h.tokens.WaitForToken(r.Context(), subj, tok)
	if err == nil && h.pacing.turns != nil {
		if fresh, err = h.turnWithToken(w, r, subj, fresh); fresh == nil && err == nil {
			metrics.Replays.WithLabelValues("no_turn").Inc()
			span.End(tokens.OutcomeRateLimited)
			return nil // answered 429
		}
	}
	if err != nil {
		metrics.Replays.WithLabelValues("no_token").Inc()
		span.EndErr(err)
		h.writeTokenError(w, r, subj, err)
		return nil
	}
	if ce := h.logger.Check(zapcore.DebugLevel, "replaying after 401 with a new token"); ce != nil {
		ce.Write(zap.String("tenant", subj.Tenant), zap.String("method", r.Method))
	}
	metrics.Replays.WithLabelValues("replayed").Inc()
	r.Header["Authorization"] = []string{fresh.Bearer}
	setBody(r, body)
	uw.reset(w, h, subj, fresh, false)
	uw.replay = true
	err = next.ServeHTTP(uw, r)
	countProxyError(uw, err)
	span.EndErr(err)
	return err
}

// countProxyError counts the answer Caddy gives for an error of the next
// handler (reverse_proxy could not reach Fortnox) as the sidecar's.
func countProxyError(uw *upstreamWriter, err error) {
	if err == nil || uw.wroteHeader {
		return
	}
	status := http.StatusBadGateway
	var he caddyhttp.HandlerError
	if errors.As(err, &he) && he.StatusCode != 0 {
		status = he.StatusCode
	}
	metrics.SidecarAnswered(status)
}

// oldFortnoxAuthHeaders are the headers of Fortnox's retired auth scheme,
// which some SDKs still send on every request: the client secret and a
// long-lived token. They never reach Fortnox through the sidecar.
var oldFortnoxAuthHeaders = [...]string{"Access-Token", "Client-Secret", "Authorization-Code"}

// ownedHeaders are the headers the sidecar owns, in canonical form: never
// forwarded as the app sent them (headers, Connection options, trailers).
func ownedHeaders(tenantHeader, accountHeader string) []string {
	return append([]string{"Authorization", "Proxy-Authorization", tenantHeader, accountHeader}, oldFortnoxAuthHeaders[:]...)
}

// ownHeaders removes what the app sent in the headers the sidecar owns:
// its own Authorization and Proxy-Authorization, Fortnox's old
// Access-Token, Client-Secret and Authorization-Code, the tenant and
// account headers, and any Connection option naming them (reverse_proxy
// drops the headers that Connection names, which would drop the injected
// token).
func (h *Handler) ownHeaders(r *http.Request, subj tokens.Subject) {
	hdr := r.Header
	// Authorization is overwritten by the caller; the account header is
	// there only when subj names an account (resolveSubject refuses an
	// empty one). Fewer map operations on the hot path.
	delete(hdr, h.resolver.header)
	delete(hdr, "Proxy-Authorization")
	for _, k := range oldFortnoxAuthHeaders {
		delete(hdr, k)
	}
	if subj.Account != "" {
		delete(hdr, h.accountHeader)
	}
	if conn := hdr["Connection"]; len(conn) > 0 && h.namesOwned(conn) {
		var kept []string
		for _, v := range conn {
			for opt := range strings.SplitSeq(v, ",") {
				if opt = strings.TrimSpace(opt); opt != "" && !h.isOwned(opt) {
					kept = append(kept, opt)
				}
			}
		}
		if len(kept) == 0 {
			delete(hdr, "Connection")
		} else {
			hdr["Connection"] = []string{strings.Join(kept, ", ")}
		}
	}
}

// namesOwned says whether any Connection value names an owned header.
func (h *Handler) namesOwned(values []string) bool {
	for _, v := range values {
		for opt := range strings.SplitSeq(v, ",") {
			if h.isOwned(strings.TrimSpace(opt)) {
				return true
			}
		}
	}
	return false
}

func (h *Handler) isOwned(name string) bool {
	for _, o := range h.owned {
		if strings.EqualFold(name, o) {
			return true
		}
	}
	return false
}

// ownTrailers keeps the owned headers out of a request's trailers: an
// Authorization or tenant header sent as a trailer would otherwise reach
// Fortnox after the body. Trailers are known only once the body is read to
// its end, so a body still to be streamed is wrapped to clean them then,
// before reverse_proxy copies them.
func (h *Handler) ownTrailers(r *http.Request) {
	if r.Trailer == nil && r.ContentLength >= 0 {
		return // a body of known length has no trailers
	}
	h.dropOwned(r.Trailer)
	if r.Body != nil && r.Body != http.NoBody && r.GetBody == nil {
		r.Body = &trailerCleaner{ReadCloser: r.Body, h: h, r: r}
	}
}

func (h *Handler) dropOwned(hdr http.Header) {
	for k := range hdr {
		if h.isOwned(k) {
			delete(hdr, k)
		}
	}
}

// trailerCleaner drops owned trailers when the body reaches its end (which
// is when the server fills in r.Trailer).
type trailerCleaner struct {
	io.ReadCloser
	h *Handler
	r *http.Request
}

func (b *trailerCleaner) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.h.dropOwned(b.r.Trailer)
	}
	return n, err
}

// keepBody reads the request body into memory when it is small enough to
// be sent twice (replay_body_limit), and reports whether the request can be
// replayed. A larger body is left to stream; a body of unknown length is
// read up to the limit and, if longer, put back together unread.
func (h *Handler) keepBody(r *http.Request) ([]byte, bool, error) {
	// A server request with ContentLength 0 has no body (unknown length is
	// -1). Caddy wraps even an empty body (its idle-timeout reader is on
	// by default), so r.Body is rarely http.NoBody: without this check
	// every GET would allocate a buffer for nothing.
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return nil, true, nil
	}
	limit := h.replayBodyLimit
	if limit <= 0 || r.ContentLength > limit {
		return nil, false, nil
	}
	size := r.ContentLength
	if size < 0 { // unknown length: read one byte past the limit to find out
		size = limit + 1
	}
	var kept bytes.Buffer
	kept.Grow(int(min(size, 64<<10)))
	if _, err := kept.ReadFrom(io.LimitReader(r.Body, size)); err != nil {
		return nil, false, errors.New("reading the request body failed")
	}
	b := kept.Bytes()
	if int64(len(b)) > limit {
		r.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(b), r.Body), r.Body}
		return nil, false, nil
	}
	_ = r.Body.Close()
	setBody(r, b)
	return b, true, nil
}

// setBody makes r's body a fresh reader over b.
func setBody(r *http.Request, b []byte) {
	r.Body = io.NopCloser(bytes.NewReader(b))
	r.ContentLength = int64(len(b))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	if len(b) == 0 {
		r.Body, r.GetBody = http.NoBody, nil
	}
}

// upstreamWriter sits between reverse_proxy and the client to see
// Fortnox's status before it is written: it holds back a 401 that will be
// replayed, and adds Retry-After to a 429.
type upstreamWriter struct {
	http.ResponseWriter
	h          *Handler
	subj       tokens.Subject
	tok        *tokens.Token
	replayable bool
	replay     bool // this is the replay: its 401 passes through

	wroteHeader bool
	held        bool // a 401 is being swallowed for a replay

	// The response headers as they were before the first attempt, to
	// restore when its 401 is swallowed (reverse_proxy copies Fortnox's
	// headers straight into the client's header map). Most requests have
	// a handful, kept without allocating; more fall back to a clone.
	saved     [8]savedHeader
	nsaved    int
	savedMore http.Header
}

type savedHeader struct {
	key    string
	values []string
}

var upstreamWriters = sync.Pool{New: func() any { return new(upstreamWriter) }}

func getUpstreamWriter(w http.ResponseWriter, h *Handler, subj tokens.Subject, tok *tokens.Token, replayable bool) *upstreamWriter {
	uw := upstreamWriters.Get().(*upstreamWriter)
	uw.reset(w, h, subj, tok, replayable)
	uw.saveHeaders()
	return uw
}

func putUpstreamWriter(uw *upstreamWriter) {
	*uw = upstreamWriter{}
	upstreamWriters.Put(uw)
}

func (uw *upstreamWriter) reset(w http.ResponseWriter, h *Handler, subj tokens.Subject, tok *tokens.Token, replayable bool) {
	uw.ResponseWriter, uw.h, uw.subj, uw.tok, uw.replayable = w, h, subj, tok, replayable
	uw.wroteHeader, uw.held, uw.replay = false, false, false
}

func (uw *upstreamWriter) saveHeaders() {
	hdr := uw.ResponseWriter.Header()
	if len(hdr) > len(uw.saved) {
		uw.savedMore = hdr.Clone()
		return
	}
	uw.nsaved = 0
	for k, v := range hdr {
		uw.saved[uw.nsaved] = savedHeader{k, v}
		uw.nsaved++
	}
}

func (uw *upstreamWriter) restoreHeaders() {
	hdr := uw.ResponseWriter.Header()
	clear(hdr)
	if uw.savedMore != nil {
		for k, v := range uw.savedMore {
			hdr[k] = v
		}
		return
	}
	for _, s := range uw.saved[:uw.nsaved] {
		hdr[s.key] = s.values[:len(s.values):len(s.values)]
	}
}

func (uw *upstreamWriter) WriteHeader(status int) {
	if uw.wroteHeader {
		return
	}
	if status >= 100 && status < 200 && status != http.StatusSwitchingProtocols {
		uw.ResponseWriter.WriteHeader(status) // informational: more follows
		return
	}
	uw.wroteHeader = true
	switch status {
	case http.StatusUnauthorized:
		// The replay's own 401, a 401 on a token minted seconds ago, or one
		// past the subject's bound of invalidations is not the token's
		// fault (a wrong path, a missing scope): it passes through, and
		// the token stays.
		if !uw.replay && uw.h.tokens.Unauthorized(uw.subj, uw.tok) && uw.replayable {
			uw.held = true
			return
		}
		metrics.Replays.WithLabelValues("passed_through").Inc()
	case http.StatusTooManyRequests:
		uw.h.fortnoxSaidTooMany(uw.ResponseWriter.Header(), uw.subj.Tenant)
	}
	metrics.FortnoxAnswered(status)
	uw.ResponseWriter.WriteHeader(status)
}

func (uw *upstreamWriter) Write(b []byte) (int, error) {
	if !uw.wroteHeader {
		uw.WriteHeader(http.StatusOK)
	}
	if uw.held {
		return len(b), nil
	}
	return uw.ResponseWriter.Write(b)
}

// FlushError keeps reverse_proxy's flushes from writing a held 401.
func (uw *upstreamWriter) FlushError() error {
	if uw.held {
		return nil
	}
	return http.NewResponseController(uw.ResponseWriter).Flush()
}

// Unwrap lets http.ResponseController reach the connection (Hijack etc.).
func (uw *upstreamWriter) Unwrap() http.ResponseWriter { return uw.ResponseWriter }

// fortnoxSaidTooMany handles a 429 from Fortnox: other processes share the
// tenant's budget, so this one slows down for a window, and the app is
// told to wait at least that long.
func (h *Handler) fortnoxSaidTooMany(hdr http.Header, tenant string) {
	metrics.Upstream429.Inc()
	wait := max(h.pacing.window, fortnoxWindow)
	if d, ok := tokens.ParseRetryAfter(hdr.Get("Retry-After")); ok && d > wait {
		wait = d
	}
	h.pacing.penalize(tenant, wait)
	hdr.Set("Retry-After", strconv.Itoa(int((wait+time.Second-1)/time.Second)))
	if ce := h.logger.Check(zapcore.DebugLevel, "Fortnox answered 429: slowing the tenant down"); ce != nil {
		ce.Write(zap.String("tenant", tenant), zap.Duration("for", wait))
	}
}
