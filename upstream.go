package fortnox

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Fortnox's own rate-limit window: the least an app is told to wait after
// Fortnox answered 429, whatever our limiter is set to.
const fortnoxWindow = 5 * time.Second

// proxy hands the request to the next handler (reverse_proxy) and watches
// Fortnox's answer. A 401 means the token was revoked or expired early:
// the tenant's token is dropped and, when the body could be kept, the
// request is sent once more with a new token, invisibly to the app. A 429
// slows the tenant's limiter down and tells the app when to come back.
func (h *Handler) proxy(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, tenant string, tok *cachedToken) error {
	body, replayable, err := h.keepBody(r)
	if err != nil {
		return caddyhttp.Error(http.StatusBadRequest, err)
	}
	uw := getUpstreamWriter(w, h, tenant, tok, replayable)
	defer putUpstreamWriter(uw)
	if err := next.ServeHTTP(uw, r); err != nil || !uw.held {
		return err
	}

	// Fortnox answered 401 and the answer was held back: replay once.
	uw.restoreHeaders()
	fresh, err := h.tokens.waitForToken(r.Context(), tenant, tok)
	if err != nil {
		metrics.replays.WithLabelValues("no_token").Inc()
		h.writeTokenError(w, r, tenant, err)
		return nil
	}
	if ce := h.logger.Check(zapcore.DebugLevel, "replaying after 401 with a new token"); ce != nil {
		ce.Write(zap.String("tenant", tenant), zap.String("method", r.Method))
	}
	metrics.replays.WithLabelValues("replayed").Inc()
	r.Header["Authorization"] = []string{fresh.bearer}
	setBody(r, body)
	uw.reset(w, h, tenant, fresh, false)
	return next.ServeHTTP(uw, r)
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
	tenant     string
	tok        *cachedToken
	replayable bool

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

func getUpstreamWriter(w http.ResponseWriter, h *Handler, tenant string, tok *cachedToken, replayable bool) *upstreamWriter {
	uw := upstreamWriters.Get().(*upstreamWriter)
	uw.reset(w, h, tenant, tok, replayable)
	uw.saveHeaders()
	return uw
}

func putUpstreamWriter(uw *upstreamWriter) {
	*uw = upstreamWriter{}
	upstreamWriters.Put(uw)
}

func (uw *upstreamWriter) reset(w http.ResponseWriter, h *Handler, tenant string, tok *cachedToken, replayable bool) {
	uw.ResponseWriter, uw.h, uw.tenant, uw.tok, uw.replayable = w, h, tenant, tok, replayable
	uw.wroteHeader, uw.held = false, false
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
		uw.h.tokens.invalidate(uw.tenant, uw.tok)
		if uw.replayable {
			uw.held = true
			return
		}
		metrics.replays.WithLabelValues("passed_through").Inc()
	case http.StatusTooManyRequests:
		uw.h.fortnoxSaidTooMany(uw.ResponseWriter.Header(), uw.tenant)
	}
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
	metrics.upstream429.Inc()
	wait := max(h.rateWindow, fortnoxWindow)
	if d, ok := parseRetryAfter(hdr.Get("Retry-After")); ok && d > wait {
		wait = d
	}
	if h.limiter != nil {
		h.limiter.penalize(tenant, wait)
	}
	hdr.Set("Retry-After", strconv.Itoa(int((wait+time.Second-1)/time.Second)))
	if ce := h.logger.Check(zapcore.DebugLevel, "Fortnox answered 429: slowing the tenant down"); ce != nil {
		ce.Write(zap.String("tenant", tenant), zap.Duration("for", wait))
	}
}
