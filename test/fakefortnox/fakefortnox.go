// Package fakefortnox is a fake Fortnox for tests and demos: the token
// endpoint (client credentials, refresh token and authorization code grants),
// the authorize page, the revoke endpoint and a small /3/ API that checks
// Bearer tokens and enforces the per-tenant rate limit.
//
// It reproduces what the project's notes on Fortnox (FORTNOX.md) say it does,
// including its quirks (invalid_client served as text/plain, invalid_grant
// as text/html, refresh tokens that work exactly once). Where the real
// behaviour is unknown, the fake has a switch so tests can try each plausible
// answer (SetNoConsentAnswer, SetFault).
//
// Besides honest behaviour, it can misbehave on purpose and be inspected at
// the wire:
//   - Faults of the token endpoint (SetFault, and per tenant SetTenantFault):
//     dropped connections, delays, any status with a chosen body, content
//     type, size, Retry-After or Location.
//   - Tokens bound to the wrong tenant (MisbindClientCredentials) or carrying
//     no tenantId claim at all (SetOmitTenantClaim).
//   - /3/always-401/...: a path that answers 401 even to a valid token, as
//     Fortnox does for a missing scope or a wrong URL. The request takes a
//     rate-limit turn first, like any request that reached Fortnox.
//   - Refresh-token chains of named users (IssueUserRefreshToken) and a count
//     of the live tokens of a chain (LiveRefreshTokens).
//   - Logs: every /3/ request with its headers, body and trailers
//     (APIRequests), every token endpoint request with its grant, tenant,
//     user, client authentication and answer (TokenRequestLog), how often a
//     refresh token was sent (RefreshTokenUses) and how many revocations
//     killed a live token (Revocations).
//
// Everything on a Server is safe for concurrent use.
package fakefortnox

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	defaultTokenLifetime = time.Hour
	defaultRateLimit     = 25
	defaultRateWindow    = 5 * time.Second

	refreshTokenLifetime = 45 * 24 * time.Hour
	codeLifetime         = 10 * time.Minute

	defaultAuthorizeTenant = "1234567"
	defaultAuthorizeUser   = "1"

	minBindingsPruneAt = 1024

	maxTokenBody = 64 << 10
	maxAPIBody   = 10 << 20
)

// defaultScopes are the scopes of a consent made by GrantConsent or
// IssueRefreshToken. The first two are the ones the plugin's own calls need.
var defaultScopes = []string{
	"companyinformation", "settings", "invoice", "customer", "article",
	"bookkeeping", "supplier", "supplierinvoice", "order", "offer", "payment",
	"project", "costcenter", "currency", "archive", "inbox", "connectfile",
	"salary", "time", "price", "print", "assets", "profile",
	"noxfinansinvoice", "warehouse", "developer",
}

// Options configure a new Server. The zero value is usable: no clients,
// 1h tokens, 25 requests per 5s.
type Options struct {
	Clients       map[string]string // client_id -> client_secret
	TokenLifetime time.Duration     // default 1h; expires_in in answers and exp-iat in JWTs
	RateLimit     int               // default 25 (0 = default, <0 = off)
	RateWindow    time.Duration     // default 5s
}

// Fault makes the token endpoint misbehave (see SetFault and
// SetTenantFault). The zero value is no fault. Down needs a hijackable
// connection (a real HTTP/1 server); otherwise it aborts the handler with
// http.ErrAbortHandler.
//
// The fields after Status shape a Status answer and are ignored without
// one. Its body is Body, or "fake fault: <status> <text>" when Body is "";
// with BodySize > 0 the body is exactly BodySize bytes: Body cut or padded
// with spaces (so a JSON Body stays valid JSON), or BodySize bytes of 'x'
// when Body is "".
type Fault struct {
	Down   bool          // token endpoint: hijack and close the connection with no answer
	Status int           // token endpoint: answer this status (e.g. 500, 503, 429) with a small body
	Delay  time.Duration // token endpoint: sleep this long (respecting r.Context()) before answering

	ContentType string // Content-Type of the Status answer; "" means text/plain
	Body        string // body of the Status answer; "" means the default text
	BodySize    int    // > 0: the Status answer's body is exactly this many bytes (see above)
	RetryAfter  string // Retry-After header of the Status answer, sent as is ("" = none)
	Location    string // Location header of the Status answer, for redirect statuses ("" = none)

	// AnswerDelay: the request is carried out first (a refresh token is
	// rotated, a code spent), then its answer waits this long, whether or
	// not the client is still there. A client that gives up meanwhile
	// never sees the new tokens, as when a connection dies after Fortnox
	// rotated a refresh token. Ignored with Down or Status.
	AnswerDelay time.Duration
}

// grantKey names one customer's grant to one integration: the unit of
// consent, revocation and rate limiting.
type grantKey struct {
	clientID string
	tenant   string
}

// tenantBinding is the tenant of an access token minted without a tenantId
// claim (SetOmitTenantClaim), kept on the server under the token's jti.
type tenantBinding struct {
	tenant string
	exp    int64 // the token's exp claim: the binding is dropped after it
}

type refreshGrant struct {
	clientID string
	tenant   string
	userID   string
	scopes   []string
	issuedAt time.Time
	// chain names the line of rotations the token belongs to: every token
	// rotated from it carries the same chain.
	chain string
}

type authCode struct {
	clientID    string
	tenant      string
	userID      string
	redirectURI string
	scopes      []string
	service     bool // account_type=service: the exchange grants a service-account consent
	issuedAt    time.Time
}

// Server is the fake Fortnox. Create it with New or Start.
type Server struct {
	key []byte // HS256 signing key, random per server

	clockOffset atomic.Int64  // nanoseconds added to time.Now by Advance
	tokenSeq    atomic.Uint64 // sequence number of the last access token minted

	mu            sync.Mutex
	clients       map[string]string
	consents      map[grantKey][]string // scopes of each service-account consent
	refreshTokens map[string]refreshGrant
	// spentTokens: refresh tokens that were rotated (spent), with their
	// chain; presenting one again is a reuse (see SpentRefreshTokenReuses).
	spentTokens map[string]string
	// revokeChainOnReuse: a spent refresh token presented again kills the
	// live token of its chain too (OAuth 2.1's reuse detection).
	revokeChainOnReuse bool
	codes              map[string]authCode
	revokedUpTo        map[grantKey]uint64 // tokens with a sequence number up to this are revoked
	tokenLifetime      time.Duration
	rateLimit          int // <0: off
	rateWindow         time.Duration
	rateHits           map[grantKey][]time.Time
	fault              Fault
	tenantFaults       map[string]Fault    // by tenant (SetTenantFault)
	misbound           map[grantKey]string // (client, asked tenant) -> tenant the token names
	omitTenantClaim    bool
	boundTenants       map[string]tenantBinding // jti -> tenant, for tokens without a tenantId claim
	bindingsPruneAt    int                      // prune expired bindings when the map reaches this size
	noConsentStatus    int
	noConsentError     string
	authorizeTenant    string
	authorizeUser      string
	denyError          string
	denyDescription    string
	companies          []Company // the authorize page's choice (SetAuthorizePage); nil: approve at once

	stats stats

	listenMu sync.Mutex
	listener net.Listener
	httpSrv  *http.Server
}

// New returns a fake that is not yet listening: serve it with Listen, or
// hand it to httptest.NewServer as an http.Handler.
func New(opts Options) *Server {
	s := &Server{
		key:             randomBytes(32),
		clients:         make(map[string]string),
		consents:        make(map[grantKey][]string),
		refreshTokens:   make(map[string]refreshGrant),
		spentTokens:     make(map[string]string),
		codes:           make(map[string]authCode),
		revokedUpTo:     make(map[grantKey]uint64),
		rateHits:        make(map[grantKey][]time.Time),
		tenantFaults:    make(map[string]Fault),
		misbound:        make(map[grantKey]string),
		boundTenants:    make(map[string]tenantBinding),
		bindingsPruneAt: minBindingsPruneAt,
		noConsentStatus: http.StatusBadRequest,
		noConsentError:  "unauthorized_client",
		authorizeTenant: defaultAuthorizeTenant,
		authorizeUser:   defaultAuthorizeUser,
	}
	for id, secret := range opts.Clients {
		s.clients[id] = secret
	}
	s.SetTokenLifetime(opts.TokenLifetime)
	s.SetRateLimit(opts.RateLimit, opts.RateWindow)
	s.stats.reset()
	return s
}

// Start returns a fake already serving on a free port of 127.0.0.1.
func Start(opts Options) (*Server, error) {
	s := New(opts)
	if err := s.Listen("127.0.0.1:0"); err != nil {
		return nil, err
	}
	return s, nil
}

// Listen starts serving on addr in the background; it returns once the
// listener is open, so URL is valid when it returns nil.
func (s *Server) Listen(addr string) error {
	s.listenMu.Lock()
	defer s.listenMu.Unlock()
	if s.listener != nil {
		return errors.New("fakefortnox: already listening on " + s.listener.Addr().String())
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	s.listener, s.httpSrv = ln, srv
	go func() { _ = srv.Serve(ln) }() // returns ErrServerClosed after Close: nothing to report
	return nil
}

// URL is the base URL ("http://127.0.0.1:port"), or "" when the fake is not
// listening (e.g. when it is served by httptest).
func (s *Server) URL() string {
	s.listenMu.Lock()
	defer s.listenMu.Unlock()
	if s.listener == nil {
		return ""
	}
	return "http://" + s.listener.Addr().String()
}

// TokenURL is URL()+"/oauth-v1/token".
func (s *Server) TokenURL() string {
	return s.URL() + "/oauth-v1/token"
}

// Close stops listening and drops every open connection, which also ends
// requests held by a Fault.Delay.
func (s *Server) Close() {
	s.listenMu.Lock()
	srv := s.httpSrv
	s.listenMu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// ServeHTTP routes to the token endpoint, the authorize page, the revoke
// endpoint and the /3/ API. Paths are matched as sent, without the cleaning
// and redirects of http.ServeMux, so the API log shows exactly what arrived.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case strings.HasPrefix(r.URL.Path, "/3/"):
		s.serveAPI(w, r)
	case r.URL.Path == "/oauth-v1/token":
		if !allowMethod(w, r, http.MethodPost) {
			return
		}
		s.serveToken(w, r)
	case r.URL.Path == "/oauth-v1/auth" && r.Method == http.MethodPost:
		s.serveAuthorizeDecision(w, r)
	case r.URL.Path == "/oauth-v1/auth":
		if !allowMethod(w, r, http.MethodGet) {
			return
		}
		s.serveAuthorize(w, r)
	case r.URL.Path == "/oauth-v1/revoke":
		if !allowMethod(w, r, http.MethodPost) {
			return
		}
		s.serveRevoke(w, r)
	default:
		http.NotFound(w, r)
	}
}

func allowMethod(w http.ResponseWriter, r *http.Request, method string) bool {
	if r.Method == method {
		return true
	}
	w.Header().Set("Allow", method)
	http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	return false
}

// Now is the fake's clock: time.Now plus everything passed to Advance.
// Token iat/exp, expiry checks, code and refresh-token lifetimes and the
// rate-limit window all use it.
func (s *Server) Now() time.Time {
	return time.Now().Add(time.Duration(s.clockOffset.Load()))
}

// Advance moves the fake's clock forward by d (backward if d < 0).
func (s *Server) Advance(d time.Duration) {
	s.clockOffset.Add(int64(d))
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand since Go 1.24)
	return b
}

func randomHex(nBytes int) string {
	return hex.EncodeToString(randomBytes(nBytes))
}

// isTenantID reports whether s looks like a Fortnox TenantId: digits that
// fit an int64, without a leading zero, so that the header value, the JWT's
// integer tenantId and DatabaseNumber all spell the same tenant.
func isTenantID(s string) bool {
	if s == "" || len(s) > 18 || s[0] == '0' {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}
