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
	Tenant   string // from the token's payload when it decodes, else ""
	ClientID string // likewise
	Status   int    // what the fake answered
	At       time.Time
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
}

// beginTokenRequest counts a token request and notes the concurrency; the
// caller must call endTokenRequest when the request is answered.
func (st *stats) beginTokenRequest(grant, tenant string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.tokenRequests[tokenRequestKey{grant, tenant}]++
	st.inFlight++
	st.maxInFlight = max(st.maxInFlight, st.inFlight)
}

func (st *stats) endTokenRequest() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.inFlight--
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

// Unauthorized counts /3/ 401 answers, by the tenant in the token's payload
// when it decodes ("" = all).
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
		out = append(out, req)
	}
	return out
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

// Reset clears every counter, the /3/ request log and the last authorize
// query. State (clients, consents, tokens, switches, clock) stays.
func (s *Server) Reset() {
	s.stats.reset()
}
