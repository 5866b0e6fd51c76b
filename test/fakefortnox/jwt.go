package fakefortnox

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

const (
	jwtIssuer = "https://api.fortnox.se/oauth2"

	// targetTokenLength is about the length of a real Fortnox access token:
	// the plugin must cope with headers that big.
	targetTokenLength = 3000
)

// jwtHeader is the fixed, already encoded JOSE header of every token.
var jwtHeader = base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`))

// claims are the payload of an access token, named as Fortnox names them.
type claims struct {
	Aud        string   `json:"aud"`
	Sub        string   `json:"sub"`
	Iss        string   `json:"iss"`
	Exp        int64    `json:"exp"`
	Iat        int64    `json:"iat"`
	Jti        string   `json:"jti"`
	TenantID   *int64   `json:"tenantId,omitempty"` // nil: no claim (SetOmitTenantClaim)
	ClientID   string   `json:"clientId"`
	UserID     string   `json:"userId,omitempty"`
	Scope      string   `json:"scope"`
	Scopes     []string `json:"scopes"`
	AuthSource string   `json:"authsource"`
	// FakePadding brings the token to the size of a real one. Fortnox's
	// tokens carry more than the claims above; what exactly is unknown.
	FakePadding string `json:"fakePadding,omitempty"`
}

// tenant is the tenant claim as the string the rest of the fake uses, ""
// when the token has none (or an impossible one).
func (c claims) tenant() string {
	if c.TenantID == nil || *c.TenantID <= 0 {
		return ""
	}
	return strconv.FormatInt(*c.TenantID, 10)
}

// seq is the token's sequence number, which revocation compares against.
// It is the first part of the jti; the rest is random.
func (c claims) seq() (uint64, bool) {
	hexSeq, _, ok := strings.Cut(c.Jti, "-")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(hexSeq, 16, 64)
	return n, err == nil
}

// mintAccessToken signs a new access token for the grant. userID is "" for
// client credentials. It returns the token and the lifetime it was given.
// While SetOmitTenantClaim is on, the token carries no tenantId claim and
// its tenant is kept on the server under its jti instead, so that /3/ still
// knows whose token it is.
func (s *Server) mintAccessToken(clientID, tenant, userID string, scopes []string) (string, time.Duration) {
	s.mu.Lock()
	lifetime, omitTenant := s.tokenLifetime, s.omitTenantClaim
	s.mu.Unlock()

	iat := s.Now().Unix()
	c := claims{
		Aud:        clientID,
		Sub:        userID + "@" + tenant, // "@<tenant>" for a service account: it has no user
		Iss:        jwtIssuer,
		Iat:        iat,
		Exp:        iat + int64(lifetime/time.Second),
		Jti:        fmt.Sprintf("%016x-%s", s.tokenSeq.Add(1), randomHex(12)),
		ClientID:   clientID,
		UserID:     userID,
		Scope:      strings.Join(scopes, " "),
		Scopes:     scopes,
		AuthSource: "OAUTH2",
	}
	if omitTenant {
		s.bindTenant(c.Jti, tenant, c.Exp)
	} else {
		tenantID, _ := strconv.ParseInt(tenant, 10, 64) // 0 for a tenant that is not digits, as before
		c.TenantID = &tenantID
	}
	token := s.sign(c)
	// Pad to about the real size: each padding byte adds 4/3 of a byte to
	// the token, and the claim's own name and quotes cost ~18 bytes.
	if short := targetTokenLength - len(token); short > 40 {
		c.FakePadding = randomHex((short*3/4 - 18) / 2)
		token = s.sign(c)
	}
	return token, lifetime
}

// bindTenant remembers the tenant of a token minted without a tenantId
// claim. Bindings of expired tokens are dropped now and then, so a long run
// does not grow the map.
func (s *Server) bindTenant(jti, tenant string, exp int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.boundTenants) >= s.bindingsPruneAt {
		now := s.Now().Unix()
		for j, b := range s.boundTenants {
			if now >= b.exp {
				delete(s.boundTenants, j)
			}
		}
		s.bindingsPruneAt = max(minBindingsPruneAt, 2*len(s.boundTenants))
	}
	s.boundTenants[jti] = tenantBinding{tenant: tenant, exp: exp}
}

// tenantOf is the tenant a token belongs to: its tenantId claim, or for a
// token minted without one, the tenant bound to its jti ("" if none).
func (s *Server) tenantOf(c claims) string {
	if c.TenantID != nil {
		return c.tenant()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.boundTenants[c.Jti].tenant
}

func (s *Server) sign(c claims) string {
	payload, err := json.Marshal(c)
	if err != nil {
		panic(err) // cannot happen: claims has only strings, numbers and a string slice
	}
	signingInput := jwtHeader + "." + base64.RawURLEncoding.EncodeToString(payload)
	return signingInput + "." + base64.RawURLEncoding.EncodeToString(s.mac(signingInput))
}

func (s *Server) mac(signingInput string) []byte {
	m := hmac.New(sha256.New, s.key)
	m.Write([]byte(signingInput))
	return m.Sum(nil)
}

var errBadToken = errors.New("malformed token")

// parseToken decodes a token's payload and checks its signature. The claims
// are returned whenever the payload decodes, even when the signature is bad,
// so that a forged token's 401 can still be counted under its tenant.
func (s *Server) parseToken(token string) (c claims, signed bool, err error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return claims{}, false, errBadToken
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return claims{}, false, errBadToken
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return claims{}, false, errBadToken
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil || parts[0] != jwtHeader {
		return c, false, nil
	}
	return c, hmac.Equal(sig, s.mac(parts[0]+"."+parts[1])), nil
}
