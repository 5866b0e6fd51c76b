package fakefortnox

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Content types of the token endpoint's error answers. Fortnox serves some
// OAuth JSON errors under a wrong type; the plugin must read them anyway.
const (
	typeJSON  = "application/json"
	typePlain = "text/plain"
	typeHTML  = "text/html"
)

type tokenAnswer struct {
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token,omitempty"`
	Scope        string `json:"scope"`
	ExpiresIn    int64  `json:"expires_in"`
	TokenType    string `json:"token_type"`
}

type oauthError struct {
	Error       string `json:"error"`
	Description string `json:"error_description"`
}

// serveToken is POST /oauth-v1/token.
func (s *Server) serveToken(w http.ResponseWriter, r *http.Request) {
	// The body is read before the fault so that every request, fault or
	// not, is counted under its grant and tenant.
	form, formErr := readForm(r)
	grant := form.Get("grant_type")
	tenant, user := s.ownerOfTokenRequest(grant, form, r)
	s.stats.beginTokenRequest(grant, tenant, form.Get("refresh_token"))
	defer s.stats.endTokenRequest()

	rec := &tokenRecorder{ResponseWriter: w, stats: &s.stats, entry: TokenRequest{
		Grant:        grant,
		TenantHeader: r.Header.Get("TenantId"),
		Tenant:       tenant,
		User:         user,
		ClientAuth:   clientAuthOf(r, form),
		RefreshToken: form.Get("refresh_token"),
		At:           s.Now(),
	}}
	defer rec.record(0) // no answer at all (the client left during a delay): logged as 0
	w = rec

	fault := s.faultFor(grant, tenant)
	if !s.applyFault(rec, r, fault) {
		return
	}
	rec.delay = fault.AnswerDelay
	clientID, ok := s.authenticateClient(r)
	if !ok {
		s.invalidClient(w)
		return
	}
	if formErr != "" {
		s.oauthError(w, http.StatusBadRequest, typeJSON, "invalid_request", formErr)
		return
	}
	switch grant {
	case "client_credentials":
		s.clientCredentialsGrant(w, r, clientID)
	case "refresh_token":
		s.refreshTokenGrant(w, clientID, form.Get("refresh_token"))
	case "authorization_code":
		s.authorizationCodeGrant(w, clientID, form.Get("code"), form.Get("redirect_uri"))
	default:
		s.oauthError(w, http.StatusBadRequest, typeJSON, "unsupported_grant_type",
			fmt.Sprintf("Unsupported grant type %q", grant))
	}
}

// tokenRecorder logs a token request with the status it is answered, just
// before the answer goes out.
type tokenRecorder struct {
	http.ResponseWriter
	stats  *stats
	entry  TokenRequest
	logged bool
	delay  time.Duration // Fault.AnswerDelay: before the answer goes out
}

// record logs the request with status, once, after the answer's delay.
func (rec *tokenRecorder) record(status int) {
	if rec.logged {
		return
	}
	if rec.delay > 0 && status != 0 {
		time.Sleep(rec.delay)
	}
	rec.logged = true
	rec.entry.Status = status
	rec.stats.recordTokenRequest(rec.entry)
}

func (rec *tokenRecorder) WriteHeader(status int) {
	rec.record(status)
	rec.ResponseWriter.WriteHeader(status)
}

func (rec *tokenRecorder) Write(b []byte) (int, error) {
	rec.record(http.StatusOK) // what net/http answers for a Write without WriteHeader
	return rec.ResponseWriter.Write(b)
}

// Hijack lets Fault.Down drop the connection through the recorder.
func (rec *tokenRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	hj, ok := rec.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errors.New("fakefortnox: the connection cannot be hijacked")
	}
	return hj.Hijack()
}

func (rec *tokenRecorder) Unwrap() http.ResponseWriter {
	return rec.ResponseWriter
}

// clientAuthOf says how a token request authenticated its client: "basic",
// "body", "both" or "none".
func clientAuthOf(r *http.Request, form url.Values) string {
	scheme, _, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	basic := strings.EqualFold(scheme, "Basic")
	body := form.Has("client_id") || form.Has("client_secret")
	switch {
	case basic && body:
		return "both"
	case basic:
		return "basic"
	case body:
		return "body"
	default:
		return "none"
	}
}

// readForm reads an application/x-www-form-urlencoded body of at most
// 64 KiB. On failure the form is empty and the reason is returned.
func readForm(r *http.Request) (url.Values, string) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxTokenBody+1))
	if err != nil {
		return url.Values{}, "Could not read the request body"
	}
	if len(body) > maxTokenBody {
		return url.Values{}, "Request body too large"
	}
	mediaType, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mediaType != "application/x-www-form-urlencoded" {
		return url.Values{}, "Content-Type must be application/x-www-form-urlencoded"
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		return url.Values{}, "Malformed form body"
	}
	return form, ""
}

// ownerOfTokenRequest is the tenant a token request is counted under and
// the user it is for: the refresh token's or code's tenant and user for
// those grants, the TenantId header (and no user) otherwise.
func (s *Server) ownerOfTokenRequest(grant string, form url.Values, r *http.Request) (tenant, user string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch grant {
	case "refresh_token":
		g := s.refreshTokens[form.Get("refresh_token")]
		return g.tenant, g.userID
	case "authorization_code":
		c := s.codes[form.Get("code")]
		return c.tenant, c.userID
	default:
		return r.Header.Get("TenantId"), ""
	}
}

// faultFor is the fault a token request meets: its tenant's own fault
// (SetTenantFault) when it has one, else the global one (SetFault). Tenant
// faults apply only to the three grants, where the tenant means something.
func (s *Server) faultFor(grant, tenant string) Fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch grant {
	case "client_credentials", "refresh_token", "authorization_code":
		if f, ok := s.tenantFaults[tenant]; ok && tenant != "" {
			return f
		}
	}
	return s.fault
}

// applyFault plays the fault f and reports whether the request should
// still be answered normally.
func (s *Server) applyFault(rec *tokenRecorder, r *http.Request, f Fault) bool {
	if f.Delay > 0 {
		t := time.NewTimer(f.Delay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-r.Context().Done():
			return false // the client is gone: nobody to answer
		}
	}
	if f.Down {
		rec.record(0) // before the client can see the connection close
		dropConnection(rec)
		return false
	}
	if f.Status != 0 {
		writeFaultAnswer(rec, f)
		return false
	}
	return true
}

// writeFaultAnswer writes the Status answer of a fault.
func writeFaultAnswer(w http.ResponseWriter, f Fault) {
	contentType := f.ContentType
	if contentType == "" {
		contentType = typePlain
	}
	body := f.Body
	if body == "" && f.BodySize <= 0 {
		body = fmt.Sprintf("fake fault: %d %s\n", f.Status, http.StatusText(f.Status))
	}
	if f.BodySize > 0 {
		pad := " " // keeps a JSON body valid JSON
		if body == "" {
			pad = "x"
		}
		if len(body) > f.BodySize {
			body = body[:f.BodySize]
		}
		body += strings.Repeat(pad, f.BodySize-len(body))
	}
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	if f.RetryAfter != "" {
		h.Set("Retry-After", f.RetryAfter)
	}
	if f.Location != "" {
		h.Set("Location", f.Location)
	}
	w.WriteHeader(f.Status)
	io.WriteString(w, body) // a client that stops reading early is no error of the fake
}

// dropConnection closes the connection without a word, like a crashed or
// unreachable server.
func dropConnection(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			conn.Close()
			return
		}
	}
	// Not hijackable (HTTP/2): abort, which resets the stream.
	panic(http.ErrAbortHandler)
}

// authenticateClient checks HTTP Basic client authentication and returns
// the client id. Both the raw and the form-decoded id and secret are tried,
// since RFC 6749 clients (x/oauth2 among them) form-encode them first.
func (s *Server) authenticateClient(r *http.Request) (string, bool) {
	id, secret, ok := r.BasicAuth()
	if !ok {
		return "", false
	}
	if s.clientSecretIs(id, secret) {
		return id, true
	}
	decodedID, err1 := url.QueryUnescape(id)
	decodedSecret, err2 := url.QueryUnescape(secret)
	if err1 == nil && err2 == nil && s.clientSecretIs(decodedID, decodedSecret) {
		return decodedID, true
	}
	return "", false
}

func (s *Server) clientSecretIs(id, secret string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	want, ok := s.clients[id]
	return ok && want == secret
}

func (s *Server) clientKnown(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.clients[id]
	return ok
}

func (s *Server) invalidClient(w http.ResponseWriter) {
	s.oauthError(w, http.StatusUnauthorized, typePlain, "invalid_client", "The client credentials are invalid")
}

func (s *Server) invalidGrant(w http.ResponseWriter, description string) {
	s.oauthError(w, http.StatusBadRequest, typeHTML, "invalid_grant", description)
}

// oauthError writes a token endpoint's OAuth error answer and counts it.
func (s *Server) oauthError(w http.ResponseWriter, status int, contentType, code, description string) {
	s.stats.countTokenError(code)
	writeOAuthError(w, status, contentType, code, description)
}

// writeOAuthError writes an OAuth error body under the given Content-Type.
func writeOAuthError(w http.ResponseWriter, status int, contentType, code, description string) {
	body, _ := json.Marshal(oauthError{Error: code, Description: description})
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", typeJSON)
	w.WriteHeader(status)
	w.Write(body)
}

func (s *Server) clientCredentialsGrant(w http.ResponseWriter, r *http.Request, clientID string) {
	tenant := r.Header.Get("TenantId")
	if !isTenantID(tenant) {
		s.oauthError(w, http.StatusBadRequest, typeJSON, "invalid_request", "The TenantId header is missing or not a TenantId")
		return
	}
	s.mu.Lock()
	scopes, consented := s.consents[grantKey{clientID, tenant}]
	status, code := s.noConsentStatus, s.noConsentError
	s.mu.Unlock()
	if !consented {
		s.noConsent(w, status, code)
		return
	}
	s.mu.Lock()
	issued, misbound := s.misbound[grantKey{clientID, tenant}]
	s.mu.Unlock()
	if misbound {
		tenant = issued // the token names another tenant than the one asked for
	}
	token, lifetime := s.mintAccessToken(clientID, tenant, "", scopes)
	s.writeTokenAnswer(w, token, "", scopes, lifetime)
}

func (s *Server) noConsent(w http.ResponseWriter, status int, code string) {
	if code == "" {
		w.Header().Set("Content-Type", typePlain)
		w.WriteHeader(status)
		fmt.Fprintln(w, http.StatusText(status))
		return
	}
	s.oauthError(w, status, typeJSON, code, "The tenant has no service account consent for this client")
}

func (s *Server) refreshTokenGrant(w http.ResponseWriter, clientID, refreshToken string) {
	s.mu.Lock()
	g, ok := s.refreshTokens[refreshToken]
	expired := ok && !s.Now().Before(g.issuedAt.Add(refreshTokenLifetime))
	if expired {
		delete(s.refreshTokens, refreshToken)
	}
	if chain, spent := s.spentTokens[refreshToken]; spent && !ok {
		s.stats.countSpentReuse()
		if s.revokeChainOnReuse {
			for t, live := range s.refreshTokens {
				if live.chain == chain {
					delete(s.refreshTokens, t)
				}
			}
		}
	}
	if !ok || expired || g.clientID != clientID {
		s.mu.Unlock()
		s.invalidGrant(w, "Invalid refresh token")
		return
	}
	// The old token dies the moment the new one exists: it works once.
	delete(s.refreshTokens, refreshToken)
	s.spentTokens[refreshToken] = g.chain
	newRefresh := s.issueRefreshTokenLocked(g)
	s.mu.Unlock()

	token, lifetime := s.mintAccessToken(clientID, g.tenant, g.userID, g.scopes)
	s.writeTokenAnswer(w, token, newRefresh, g.scopes, lifetime)
}

func (s *Server) authorizationCodeGrant(w http.ResponseWriter, clientID, code, redirectURI string) {
	s.mu.Lock()
	c, ok := s.codes[code]
	expired := ok && !s.Now().Before(c.issuedAt.Add(codeLifetime))
	if expired {
		delete(s.codes, code)
	}
	// A code presented with the wrong client or redirect_uri is not used up:
	// only a successful exchange spends it.
	if !ok || expired || c.clientID != clientID || c.redirectURI != redirectURI {
		s.mu.Unlock()
		s.invalidGrant(w, "Invalid authorization code")
		return
	}
	delete(s.codes, code)
	if c.service {
		s.consents[grantKey{clientID, c.tenant}] = c.scopes
	}
	refresh := s.issueRefreshTokenLocked(refreshGrant{
		clientID: clientID,
		tenant:   c.tenant,
		userID:   c.userID,
		scopes:   c.scopes,
	})
	s.mu.Unlock()

	token, lifetime := s.mintAccessToken(clientID, c.tenant, c.userID, c.scopes)
	s.writeTokenAnswer(w, token, refresh, c.scopes, lifetime)
}

func (s *Server) writeTokenAnswer(w http.ResponseWriter, accessToken, refreshToken string, scopes []string, lifetime time.Duration) {
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, tokenAnswer{
		AccessToken:  accessToken,
		RefreshToken: refreshToken,
		Scope:        strings.Join(scopes, " "),
		ExpiresIn:    int64(lifetime / time.Second),
		TokenType:    "bearer",
	})
}

// serveAuthorize is GET /oauth-v1/auth: it approves at once as the
// SetAuthorizeAs tenant and user, or refuses as SetAuthorizeDeny says.
func (s *Server) serveAuthorize(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	s.stats.setLastQuery(q)

	redirect, ok := s.authorizeRedirect(w, q)
	if !ok {
		return
	}
	if s.showAuthorizePage(w, q) {
		return
	}

	s.mu.Lock()
	denyError, denyDescription := s.denyError, s.denyDescription
	c := authCode{
		clientID:    q.Get("client_id"),
		tenant:      s.authorizeTenant,
		userID:      s.authorizeUser,
		redirectURI: q.Get("redirect_uri"),
		scopes:      strings.Fields(q.Get("scope")),
		service:     q.Get("account_type") == "service",
		issuedAt:    s.Now(),
	}
	code := ""
	if denyError == "" {
		code = randomHex(16)
		s.codes[code] = c
		s.dropExpiredCodesLocked()
	}
	s.mu.Unlock()

	answer := redirect.Query()
	if denyError != "" {
		answer.Set("error", denyError)
		answer.Set("error_description", denyDescription)
	} else {
		answer.Set("code", code)
	}
	answer.Set("state", q.Get("state"))
	redirect.RawQuery = answer.Encode()
	http.Redirect(w, r, redirect.String(), http.StatusFound)
}

// checkAuthorizeQuery returns what is wrong with an authorize request, or "".
func (s *Server) checkAuthorizeQuery(q url.Values) string {
	switch {
	case !s.clientKnown(q.Get("client_id")):
		return "unknown client_id"
	case q.Get("response_type") != "code":
		return "response_type must be code"
	case q.Get("state") == "":
		return "state is required"
	case strings.TrimSpace(q.Get("scope")) == "":
		return "scope is required"
	case q.Get("redirect_uri") == "":
		return "redirect_uri is required"
	case q.Has("account_type") && q.Get("account_type") != "service":
		return "account_type must be service"
	}
	return ""
}

// dropExpiredCodesLocked forgets codes nobody exchanged in time, so that a
// long test run does not grow the map. The caller holds s.mu.
func (s *Server) dropExpiredCodesLocked() {
	cutoff := s.Now().Add(-codeLifetime)
	for code, c := range s.codes {
		if c.issuedAt.Before(cutoff) {
			delete(s.codes, code)
		}
	}
}

// serveRevoke is POST /oauth-v1/revoke: it kills a refresh token. Like
// RFC 7009 it answers success for a token it does not know. A
// token_type_hint, when sent, must be refresh_token: the fake (like the
// revoke call Fortnox documents) revokes nothing else.
func (s *Server) serveRevoke(w http.ResponseWriter, r *http.Request) {
	form, formErr := readForm(r)
	clientID, ok := s.authenticateClient(r)
	if !ok {
		writeOAuthError(w, http.StatusUnauthorized, typePlain, "invalid_client", "The client credentials are invalid")
		return
	}
	token := form.Get("token")
	if formErr != "" || token == "" {
		writeOAuthError(w, http.StatusBadRequest, typeJSON, "invalid_request", "token is required")
		return
	}
	if form.Has("token_type_hint") && form.Get("token_type_hint") != "refresh_token" {
		writeOAuthError(w, http.StatusBadRequest, typeJSON, "unsupported_token_type",
			fmt.Sprintf("token_type_hint %q is not supported: only refresh_token can be revoked", form.Get("token_type_hint")))
		return
	}
	s.mu.Lock()
	g, known := s.refreshTokens[token]
	live := known && g.clientID == clientID && s.Now().Before(g.issuedAt.Add(refreshTokenLifetime))
	if known && g.clientID == clientID {
		delete(s.refreshTokens, token)
	}
	s.mu.Unlock()
	if live {
		s.stats.countRevocation()
	}
	writeJSON(w, http.StatusOK, map[string]bool{"revoked": true})
}

// authorizeRedirect checks an authorize request's query (as the authorize
// page or its form sent it) and returns where to send the browser back;
// otherwise it answers 400 and returns false.
func (s *Server) authorizeRedirect(w http.ResponseWriter, q url.Values) (*url.URL, bool) {
	if problem := s.checkAuthorizeQuery(q); problem != "" {
		http.Error(w, "Fake Fortnox cannot authorize this request: "+problem, http.StatusBadRequest)
		return nil, false
	}
	redirect, err := url.Parse(q.Get("redirect_uri"))
	if err != nil || !redirect.IsAbs() {
		http.Error(w, "Fake Fortnox cannot authorize this request: redirect_uri is not an absolute URL", http.StatusBadRequest)
		return nil, false
	}
	return redirect, true
}
