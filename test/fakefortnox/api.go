package fakefortnox

import (
	"io"
	"net/http"
	"strconv"
	"strings"
)

// always401Path is a path prefix under which /3/ answers 401 even to a
// valid token, as Fortnox does for a missing scope or a wrong URL.
const always401Path = "/3/always-401"

type apiMessage struct {
	Message string `json:"message"`
}

type companyInformation struct {
	CompanyInformation struct {
		CompanyName        string
		DatabaseNumber     int64
		OrganizationNumber string
	}
}

type companySettings struct {
	CompanySettings struct {
		Name           string
		DatabaseNumber int64
	}
}

type echo struct {
	Echo struct {
		Method   string
		Path     string
		Query    string
		TenantID string `json:"TenantId"`
		ClientID string `json:"ClientId"`
		// UserID is the token's userId: whose request it is. Left out for
		// a client-credentials token (the service account has no user).
		UserID string `json:"UserId,omitempty"`
		Body   string
	}
}

// serveAPI is /3/*: it checks the Bearer token and the rate limit, answers,
// and logs the request. The log and counters are updated before the answer
// is written, so a test that has its answer sees them.
func (s *Server) serveAPI(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxAPIBody+1))
	if err != nil {
		return // the client is gone
	}
	req := APIRequest{
		Method:   r.Method,
		Path:     r.URL.Path,
		RawQuery: r.URL.RawQuery,
		Header:   r.Header.Clone(),
		Body:     body,
		Trailer:  receivedTrailer(r.Trailer), // complete only now that the body was read
		At:       s.Now(),
	}
	status, answer := s.answerAPI(r, &req)
	s.stats.recordAPIRequest(req)
	writeJSON(w, status, answer)
}

// answerAPI decides the status and body of a /3/ request and fills in the
// request's tenant, client and status.
func (s *Server) answerAPI(r *http.Request, req *APIRequest) (int, any) {
	c, tenant, ok := s.authenticateAPI(r)
	req.Tenant, req.ClientID, req.User = tenant, c.ClientID, c.UserID
	switch {
	case !ok:
		req.Status = http.StatusUnauthorized
		return req.Status, apiMessage{"unauthorized"}
	case len(req.Body) > maxAPIBody:
		req.Body = req.Body[:maxAPIBody]
		req.Status = http.StatusRequestEntityTooLarge
		return req.Status, apiMessage{"Request Entity Too Large"}
	case !s.allowAPI(grantKey{c.ClientID, req.Tenant}):
		req.Status = http.StatusTooManyRequests
		return req.Status, apiMessage{"Too Many Requests"}
	case isAlways401(r.URL.Path):
		// After the rate limit on purpose: the request reached Fortnox, so
		// it took a turn like any other.
		req.Status = http.StatusUnauthorized
		return req.Status, apiMessage{"unauthorized"}
	}
	req.Status = http.StatusOK
	databaseNumber, _ := strconv.ParseInt(tenant, 10, 64)
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/3/companyinformation":
		var a companyInformation
		a.CompanyInformation.CompanyName = "Fake Company " + req.Tenant
		a.CompanyInformation.DatabaseNumber = databaseNumber
		a.CompanyInformation.OrganizationNumber = "556000-0000"
		return req.Status, a
	case r.Method == http.MethodGet && r.URL.Path == "/3/settings/company":
		var a companySettings
		a.CompanySettings.Name = "Fake Company " + req.Tenant
		a.CompanySettings.DatabaseNumber = databaseNumber
		return req.Status, a
	default:
		var a echo
		a.Echo.Method = r.Method
		a.Echo.Path = r.URL.Path
		a.Echo.Query = r.URL.RawQuery
		a.Echo.TenantID = req.Tenant
		a.Echo.ClientID = c.ClientID
		a.Echo.UserID = c.UserID
		a.Echo.Body = string(req.Body)
		return req.Status, a
	}
}

// isAlways401 reports whether path is /3/always-401 or below it.
func isAlways401(path string) bool {
	rest, ok := strings.CutPrefix(path, always401Path)
	return ok && (rest == "" || rest[0] == '/')
}

// receivedTrailer copies the trailer fields that arrived with a value; nil
// when none did. (Fields announced in a Trailer header but never sent stay
// in r.Trailer with no value: they were not received.)
func receivedTrailer(t http.Header) http.Header {
	var out http.Header
	for name, values := range t {
		if len(values) == 0 {
			continue
		}
		if out == nil {
			out = make(http.Header)
		}
		out[name] = append([]string(nil), values...)
	}
	return out
}

// authenticateAPI checks the Bearer token: signed by this server, not
// expired on the fake clock, not revoked, for a known client and a tenant.
// It returns the claims and the token's tenant (its tenantId claim, or the
// tenant bound to its jti when it was minted without one) whenever the
// payload decodes, also when the token is refused, so the refusal can be
// counted under the token's tenant.
func (s *Server) authenticateAPI(r *http.Request) (claims, string, bool) {
	scheme, token, found := strings.Cut(r.Header.Get("Authorization"), " ")
	if !found || !strings.EqualFold(scheme, "Bearer") {
		return claims{}, "", false
	}
	c, signed, err := s.parseToken(strings.TrimSpace(token))
	if err != nil {
		return c, "", false
	}
	tenant := s.tenantOf(c)
	if !signed {
		return c, tenant, false
	}
	seq, hasSeq := c.seq()
	if !hasSeq || tenant == "" || s.Now().Unix() >= c.Exp {
		return c, tenant, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, knownClient := s.clients[c.ClientID]
	revoked := seq <= s.revokedUpTo[grantKey{c.ClientID, tenant}]
	return c, tenant, knownClient && !revoked
}

// allowAPI is the sliding-window rate limit per client and tenant: it
// admits the request and counts it, or refuses it without counting it.
func (s *Server) allowAPI(key grantKey) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rateLimit < 0 {
		return true
	}
	now := s.Now()
	cutoff := now.Add(-s.rateWindow)
	hits := s.rateHits[key]
	expired := 0
	for expired < len(hits) && !hits[expired].After(cutoff) {
		expired++
	}
	hits = hits[expired:]
	if len(hits) >= s.rateLimit {
		s.rateHits[key] = hits
		return false
	}
	s.rateHits[key] = append(hits, now)
	return true
}
