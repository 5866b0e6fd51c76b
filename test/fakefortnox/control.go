package fakefortnox

import (
	"net/http"
	"time"
)

// AddClient registers an integration (or changes its secret).
func (s *Server) AddClient(id, secret string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clients[id] = secret
}

// GrantConsent gives the client a service-account consent for the tenant,
// with the default scopes, so that client_credentials works for it.
func (s *Server) GrantConsent(clientID, tenant string) {
	s.grantConsent(clientID, tenant, defaultScopes)
}

func (s *Server) grantConsent(clientID, tenant string, scopes []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.consents[grantKey{clientID, tenant}] = scopes
}

// RevokeConsent takes the service-account consent away: client_credentials
// for the tenant gets the no-consent answer from now on. Access tokens
// already minted keep working (whether Fortnox kills them is unknown); call
// RevokeAccessTokens as well to test that case.
func (s *Server) RevokeConsent(clientID, tenant string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.consents, grantKey{clientID, tenant})
}

// IssueRefreshToken returns a new valid refresh token for the client and
// tenant (user "1", default scopes), as if the customer had authorized.
func (s *Server) IssueRefreshToken(clientID, tenant string) string {
	return s.IssueUserRefreshToken(clientID, tenant, defaultAuthorizeUser)
}

// IssueUserRefreshToken returns a new valid refresh token of the named user
// for the client and tenant (default scopes), as if that user had
// authorized. Its chain's access tokens carry userId = userID and
// sub = userID@tenant, and each refresh returns a new refresh token of the
// same user. One client may hold chains of several users of one tenant.
// userID "" means user "1", as IssueRefreshToken.
func (s *Server) IssueUserRefreshToken(clientID, tenant, userID string) string {
	if userID == "" {
		userID = defaultAuthorizeUser
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.issueRefreshTokenLocked(refreshGrant{
		clientID: clientID,
		tenant:   tenant,
		userID:   userID,
		scopes:   defaultScopes,
	})
}

// LiveRefreshTokens counts the refresh tokens of the client and tenant that
// the refresh grant would accept now (unused, unexpired, not revoked), of
// the user userID ("" = any user). A healthy chain has exactly 1: 0 means
// the chain was lost (the customer must authorize again), 2 or more that a
// token was issued but never used.
func (s *Server) LiveRefreshTokens(clientID, tenant, userID string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.Now()
	n := 0
	for _, g := range s.refreshTokens {
		if g.clientID == clientID && g.tenant == tenant && (userID == "" || g.userID == userID) &&
			now.Before(g.issuedAt.Add(refreshTokenLifetime)) {
			n++
		}
	}
	return n
}

// issueRefreshTokenLocked stores g under a new refresh token, issued now.
// The caller holds s.mu.
func (s *Server) issueRefreshTokenLocked(g refreshGrant) string {
	token := randomHex(20) // 40 lowercase hex characters, like Fortnox's
	g.issuedAt = s.Now()
	if g.chain == "" {
		g.chain = token
	}
	s.refreshTokens[token] = g
	return token
}

// RefreshTokenValid reports whether token would be accepted by the refresh
// grant now, without using it up (for tests that check a stored chain).
func (s *Server) RefreshTokenValid(token string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	g, ok := s.refreshTokens[token]
	return ok && s.Now().Before(g.issuedAt.Add(refreshTokenLifetime))
}

// RevokeAccessTokens makes /3/ reject (401) every access token minted so far
// for the client and tenant. Tokens minted afterwards work, even within the
// same second: revocation compares each token's sequence number, not iat.
func (s *Server) RevokeAccessTokens(clientID, tenant string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.revokedUpTo[grantKey{clientID, tenant}] = s.tokenSeq.Load()
}

// SetTokenLifetime sets the lifetime of access tokens minted from now on
// (d <= 0: the default 1h).
func (s *Server) SetTokenLifetime(d time.Duration) {
	if d <= 0 {
		d = defaultTokenLifetime
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenLifetime = d
}

// SetRateLimit sets the /3/ limit to n requests per window for each client
// and tenant. n < 0 turns it off; n == 0 and window <= 0 mean the defaults
// (25 per 5s). Requests already counted stay in the window.
func (s *Server) SetRateLimit(n int, window time.Duration) {
	if n == 0 {
		n = defaultRateLimit
	}
	if window <= 0 {
		window = defaultRateWindow
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rateLimit, s.rateWindow = n, window
}

// SetFault makes the token endpoint misbehave until ClearFault. Delay comes
// first, then Down, then Status. Faults never touch /3/ or the other pages.
// A tenant with its own fault (SetTenantFault) meets that one instead.
func (s *Server) SetFault(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fault = f
}

// ClearFault makes the token endpoint behave again (tenant faults stay).
func (s *Server) ClearFault() {
	s.SetFault(Fault{})
}

// SetTenantFault makes the token endpoint misbehave for one tenant only,
// until ClearTenantFault: client_credentials requests whose TenantId header
// is tenant, and refresh_token / authorization_code requests whose refresh
// token or code belongs to tenant. For those requests f replaces the global
// fault (a zero f makes the tenant behave even under a global fault).
// Requests of other grants, or whose token or code is unknown, never meet
// a tenant fault.
func (s *Server) SetTenantFault(tenant string, f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tenantFaults[tenant] = f
}

// ClearTenantFault removes the tenant's own fault: its requests meet the
// global fault, if any, again.
func (s *Server) ClearTenantFault(tenant string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.tenantFaults, tenant)
}

// MisbindClientCredentials makes client_credentials for (clientID,
// askedTenant) mint tokens whose tenantId claim (and sub) name
// issuedTenant, from now on. The request still needs a consent for
// askedTenant and gets its scopes; the token is issuedTenant's token for
// the fake's /3/ API. issuedTenant "" undoes it.
func (s *Server) MisbindClientCredentials(clientID, askedTenant, issuedTenant string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if issuedTenant == "" {
		delete(s.misbound, grantKey{clientID, askedTenant})
		return
	}
	s.misbound[grantKey{clientID, askedTenant}] = issuedTenant
}

// SetOmitTenantClaim makes access tokens minted from now on (any grant)
// carry no tenantId claim; off (the default) puts it back. sub still reads
// "<userId>@<tenant>", as the other claims are unchanged. The fake's /3/ API
// still accepts such a token for the tenant it was minted for: the server
// keeps the tenant under the token's jti (nothing in the token says it).
func (s *Server) SetOmitTenantClaim(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.omitTenantClaim = on
}

// SetNoConsentAnswer sets what client_credentials answers for a tenant
// without a service-account consent (Fortnox's real answer is unknown). The
// body is {"error":errorCode,"error_description":...} as application/json;
// with errorCode "" it is a plain-text body that is not OAuth JSON (and is
// not counted by TokenErrors). status 0 means the default, 400
// unauthorized_client.
func (s *Server) SetNoConsentAnswer(status int, errorCode string) {
	if status == 0 {
		status, errorCode = http.StatusBadRequest, "unauthorized_client"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.noConsentStatus, s.noConsentError = status, errorCode
}

// SetAuthorizeAs sets who approves on the authorize page: the tenant and
// user the codes it mints belong to ("" keeps the default 1234567 and 1).
func (s *Server) SetAuthorizeAs(tenant, userID string) {
	if tenant == "" {
		tenant = defaultAuthorizeTenant
	}
	if userID == "" {
		userID = defaultAuthorizeUser
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.authorizeTenant, s.authorizeUser = tenant, userID
}

// SetAuthorizeDeny makes the authorize page refuse: it redirects back with
// error=errCode and error_description=description. errCode "" approves again.
func (s *Server) SetAuthorizeDeny(errCode, description string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.denyError, s.denyDescription = errCode, description
}

// SetRevokeChainOnReuse makes a spent refresh token presented again revoke
// the live refresh token of its chain as well (OAuth 2.1 allows a server
// to do that): the customer must authorize again. Off by default.
func (s *Server) SetRevokeChainOnReuse(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.revokeChainOnReuse = on
}
