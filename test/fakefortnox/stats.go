package fakefortnox

import (
	"net/http"
	"net/url"
	"sync"
	"time"
)

const (
	maxLogEntries   = 10000
	maxLogBodyBytes = 64 << 20 // so a load test with big bodies cannot eat the memory either
)

// APIRequest is one /3/ request as the fake received and answered it.
type APIRequest struct {
	Method   string
	Path     string
	RawQuery string
	Header   http.Header // a clone of the request's headers
	Body     []byte
	// Trailer holds the request's trailer fields as received after the
	// body (chunked HTTP/1.1 or HTTP/2); nil when none came. A body over
	// the fake's 10 MiB limit is not read to its end, so its trailers are
	// not seen.
	Trailer http.Header
	// Tenant is the token's tenant whenever its payload decodes, valid or
	// not: its tenantId claim, or for a token minted without one
	// (SetOmitTenantClaim) the tenant the fake keeps for it; else "".
	Tenant   string
	ClientID string // from the token's payload when it decodes, else ""
	// User is the token's userId claim when its payload decodes: the
	// user whose refresh-token chain (or code) it came from; "" for a
	// client-credentials token (the service account has no user).
	User   string
	Status int // what the fake answered
	At     time.Time
}

// TokenRequest is one token endpoint request as the fake received and
// answered it (see TokenRequestLog).
type TokenRequest struct {
	Grant        string // grant_type as sent ("" when absent or the form was unreadable)
	TenantHeader string // the TenantId header as sent ("" when absent)
	// Tenant is the tenant the request counts under in TokenRequests: the
	// TenantId header for client_credentials (and unknown grants), the
	// refresh token's or code's tenant for those grants ("" when unknown).
	Tenant string
	User   string // the refresh token's or code's user; "" for other grants or unknown tokens
	// ClientAuth is how the client authenticated: "basic" (an
	// Authorization: Basic header), "body" (client_id or client_secret in
	// the form), "both" or "none". The fake accepts only Basic.
	ClientAuth   string
	RefreshToken string // the refresh_token form value as sent ("" if none)
	// Status is what the fake answered, fault answers included; 0 when it
	// answered nothing (Fault.Down, or the client left during a Delay).
	Status int
	At     time.Time // when it arrived, on the fake clock
}

type tokenRequestKey struct {
	grant  string
	tenant string
}

// stats holds what tests read back: counters and the /3/ request log.
// It has its own lock so that reading it never waits for the state lock.
type stats struct {
	mu            sync.Mutex
	tokenRequests map[tokenRequestKey]int
	tokenErrors   map[string]int
	apiCalls      map[string]int // 2xx answers by tenant
	unauthorized  map[string]int
	tooMany       map[string]int
	maxInFlight   int
	inFlight      int

	// log is a ring of the last maxLogEntries /3/ requests: logStart is the
	// oldest, logLen how many are held.
	log       []APIRequest
	logStart  int
	logLen    int
	logBytes  int
	lastQuery url.Values

	// tokenLog is a ring of the last maxLogEntries token requests, held
	// like log.
	tokenLog      []TokenRequest
	tokenLogStart int
	tokenLogLen   int
	refreshUses   map[string]int // refresh_token form value -> requests that sent it
	revocations   int
	spentReuses   int
}

func (st *stats) reset() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.tokenRequests = make(map[tokenRequestKey]int)
	st.tokenErrors = make(map[string]int)
	st.apiCalls = make(map[string]int)
	st.unauthorized = make(map[string]int)
	st.tooMany = make(map[string]int)
	st.maxInFlight = st.inFlight
	st.log = nil
	st.logStart, st.logLen, st.logBytes = 0, 0, 0
	st.lastQuery = nil
	st.tokenLog = nil
	st.tokenLogStart, st.tokenLogLen = 0, 0
	st.refreshUses = make(map[string]int)
	st.revocations = 0
	st.spentReuses = 0
}

func (st *stats) countSpentReuse() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.spentReuses++
}

// beginTokenRequest counts a token request and notes the concurrency; the
// caller must call endTokenRequest when the request is answered.
func (st *stats) beginTokenRequest(grant, tenant, refreshToken string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.tokenRequests[tokenRequestKey{grant, tenant}]++
	if refreshToken != "" {
		st.refreshUses[refreshToken]++
	}
	st.inFlight++
	st.maxInFlight = max(st.maxInFlight, st.inFlight)
}

func (st *stats) endTokenRequest() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.inFlight--
}

// recordTokenRequest adds an answered token request to the log.
func (st *stats) recordTokenRequest(req TokenRequest) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.tokenLog == nil {
		st.tokenLog = make([]TokenRequest, maxLogEntries)
	}
	if st.tokenLogLen == maxLogEntries {
		st.tokenLogStart = (st.tokenLogStart + 1) % maxLogEntries
		st.tokenLogLen--
	}
	st.tokenLog[(st.tokenLogStart+st.tokenLogLen)%maxLogEntries] = req
	st.tokenLogLen++
}

func (st *stats) countRevocation() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.revocations++
}

func (st *stats) countTokenError(code string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.tokenErrors[code]++
}

func (st *stats) recordAPIRequest(req APIRequest) {
	st.mu.Lock()
	defer st.mu.Unlock()
	switch {
	case req.Status >= 200 && req.Status < 300:
		st.apiCalls[req.Tenant]++
	case req.Status == http.StatusUnauthorized:
		st.unauthorized[req.Tenant]++
	case req.Status == http.StatusTooManyRequests:
		st.tooMany[req.Tenant]++
	}
	if st.log == nil {
		st.log = make([]APIRequest, maxLogEntries)
	}
	for st.logLen > 0 && (st.logLen == maxLogEntries || st.logBytes+len(req.Body) > maxLogBodyBytes) {
		st.dropOldest()
	}
	st.log[(st.logStart+st.logLen)%maxLogEntries] = req
	st.logLen++
	st.logBytes += len(req.Body)
}

func (st *stats) dropOldest() {
	st.logBytes -= len(st.log[st.logStart].Body)
	st.log[st.logStart] = APIRequest{}
	st.logStart = (st.logStart + 1) % maxLogEntries
	st.logLen--
}

// sumMatching adds the counts whose key matches want, "" matching anything.
func sumMatching(m map[string]int, want string) int {
	if want != "" {
		return m[want]
	}
	total := 0
	for _, n := range m {
		total += n
	}
	return total
}

// TokenRequests counts token endpoint requests by grant_type
// ("client_credentials", "refresh_token", "authorization_code") and tenant;
// "" matches any. Every request counts, also failed ones and fault answers.
// The tenant is the TenantId header for client_credentials, the refresh
// token's or code's tenant for the other grants ("" when unknown).
func (s *Server) TokenRequests(grant, tenant string) int {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	total := 0
	for k, n := range s.stats.tokenRequests {
		if (grant == "" || k.grant == grant) && (tenant == "" || k.tenant == tenant) {
			total += n
		}
	}
	return total
}

// TokenErrors counts the token endpoint's OAuth error answers by error code
// ("invalid_grant", "invalid_client", "unauthorized_client",
// "invalid_request", "unsupported_grant_type", or whatever
// SetNoConsentAnswer set); "" counts all. Fault answers are not OAuth errors.
func (s *Server) TokenErrors(code string) int {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return sumMatching(s.stats.tokenErrors, code)
}

// APICalls counts /3/ requests answered 2xx, by tenant ("" = all).
func (s *Server) APICalls(tenant string) int {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return sumMatching(s.stats.apiCalls, tenant)
}

// Unauthorized counts /3/ 401 answers, by the token's tenant as in
// APIRequest.Tenant ("" = all). Answers of /3/always-401 count too.
func (s *Server) Unauthorized(tenant string) int {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return sumMatching(s.stats.unauthorized, tenant)
}

// TooMany counts /3/ 429 answers, by tenant ("" = all).
func (s *Server) TooMany(tenant string) int {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return sumMatching(s.stats.tooMany, tenant)
}

// APIRequests returns a copy of the log of /3/ requests, oldest first. It
// holds the last 10,000 requests (fewer when their bodies pass 64 MiB).
func (s *Server) APIRequests() []APIRequest {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	out := make([]APIRequest, 0, s.stats.logLen)
	for i := range s.stats.logLen {
		req := s.stats.log[(s.stats.logStart+i)%maxLogEntries]
		req.Header = req.Header.Clone()
		req.Body = append([]byte(nil), req.Body...)
		req.Trailer = req.Trailer.Clone()
		out = append(out, req)
	}
	return out
}

// TokenRequestLog returns a copy of the log of token endpoint requests, in
// the order they were answered (the oldest first). An entry is logged just
// before its answer is sent, so a client that has its answer finds it here.
// It holds the last 10,000 requests. Every POST to /oauth-v1/token is
// logged, also failed ones and fault answers.
func (s *Server) TokenRequestLog() []TokenRequest {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	out := make([]TokenRequest, 0, s.stats.tokenLogLen)
	for i := range s.stats.tokenLogLen {
		out = append(out, s.stats.tokenLog[(s.stats.tokenLogStart+i)%maxLogEntries])
	}
	return out
}

// RefreshTokenUses counts the token endpoint requests that sent token as
// their refresh_token form value (whatever the answer), since New or Reset.
// A single-use refresh token that is sent twice shows up as 2.
func (s *Server) RefreshTokenUses(token string) int {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return s.stats.refreshUses[token]
}

// SpentRefreshTokenReuses counts the refresh-token requests that presented
// a refresh token which had already been rotated (spent), since New or
// Reset: what a sidecar must never do, since a server may revoke the whole
// chain for it (see SetRevokeChainOnReuse).
func (s *Server) SpentRefreshTokenReuses() int {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return s.stats.spentReuses
}

// Revocations counts the requests to /oauth-v1/revoke that killed a live
// refresh token (known, unexpired, of the authenticated client), since New
// or Reset. Revoking an unknown, dead or foreign token answers success, as
// RFC 7009 says, but does not count.
func (s *Server) Revocations() int {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return s.stats.revocations
}

// MaxConcurrentTokenRequests is the highest number of token endpoint
// requests that were in flight at once (since New or Reset).
func (s *Server) MaxConcurrentTokenRequests() int {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return s.stats.maxInFlight
}

// LastAuthorizeQuery returns the query of the last authorize page request,
// or nil if none came since New or Reset.
func (s *Server) LastAuthorizeQuery() url.Values {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return cloneValues(s.stats.lastQuery)
}

func (st *stats) setLastQuery(q url.Values) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.lastQuery = cloneValues(q)
}

func cloneValues(v url.Values) url.Values {
	if v == nil {
		return nil
	}
	out := make(url.Values, len(v))
	for k, vs := range v {
		out[k] = append([]string(nil), vs...)
	}
	return out
}

// Reset clears every counter, the /3/ and token request logs, the refresh
// token use counts, the revocation count and the last authorize query.
// State (clients, consents, tokens, switches, faults, clock) stays.
func (s *Server) Reset() {
	s.stats.reset()
}
