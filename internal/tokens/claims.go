package tokens

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// maxTenantIDLength bounds a TenantId. Fortnox's are 6-8 digits today;
// 15 leaves room and keeps it an exact integer in a JSON number.
const maxTenantIDLength = 15

// MaxJWTLength bounds the app's legacy token we are willing to decode.
// Fortnox tokens are about 3 KB.
const MaxJWTLength = 16 << 10

// ValidTenantID: 1 to 15 digits, no leading zero (so each tenant has one
// spelling and one cache entry).
func ValidTenantID(s string) bool {
	if len(s) == 0 || len(s) > maxTenantIDLength || s[0] == '0' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// jwtClaims are the claims of a Fortnox access token that we read.
// Nothing here is verified: Fortnox signs with a key only it holds.
type jwtClaims struct {
	TenantID json.RawMessage `json:"tenantId"`
	ClientID string          `json:"clientId"`
	UserID   json.RawMessage `json:"userId"`
	Sub      string          `json:"sub"`
	Scope    string          `json:"scope"`
	Iss      string          `json:"iss"`
	Exp      int64           `json:"exp"`
	Iat      int64           `json:"iat"`
}

// Tenant returns the tenantId claim as a TenantId string. Fortnox sends a
// JSON integer; a numeric string is accepted too.
func (c *jwtClaims) Tenant() (string, error) {
	raw := bytes.TrimSpace(c.TenantID)
	if len(raw) == 0 || string(raw) == "null" {
		return "", errors.New("the token has no tenantId claim")
	}
	s := string(bytes.Trim(raw, `"`))
	if !ValidTenantID(s) {
		return "", errors.New("the token's tenantId claim is not a TenantId")
	}
	return s, nil
}

// user returns the userId claim ("" when there is none). Fortnox's is a
// string; a number is accepted too.
func (c *jwtClaims) user() string {
	raw := strings.TrimSpace(string(c.UserID))
	if raw == "" || raw == "null" {
		return ""
	}
	return strings.Trim(raw, `"`)
}

// DecodeJWTClaims reads the payload of a JWT without checking its signature.
func DecodeJWTClaims(token string) (*jwtClaims, error) {
	if len(token) > MaxJWTLength {
		return nil, errors.New("the token is too long")
	}
	first := strings.IndexByte(token, '.')
	if first < 0 {
		return nil, errors.New("the token is not a JWT")
	}
	rest := token[first+1:]
	second := strings.IndexByte(rest, '.')
	if second < 0 {
		return nil, errors.New("the token is not a JWT")
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(rest[:second], "="))
	if err != nil {
		return nil, errors.New("the token's payload is not base64url")
	}
	var c jwtClaims
	if err := json.Unmarshal(payload, &c); err != nil {
		return nil, errors.New("the token's payload is not JSON")
	}
	return &c, nil
}

// TenantFromToken reads the tenantId claim of an access token.
func TenantFromToken(token string) (string, error) {
	c, err := DecodeJWTClaims(token)
	if err != nil {
		return "", err
	}
	return c.Tenant()
}

// TenantFromBearer reads the tenant from an `Authorization: Bearer <jwt>`
// header: the app's token from before it used the sidecar.
func TenantFromBearer(auth string) (string, error) {
	const prefix = "bearer "
	if len(auth) <= len(prefix) || !strings.EqualFold(auth[:len(prefix)], prefix) {
		return "", errors.New("no Bearer token")
	}
	return TenantFromToken(strings.TrimSpace(auth[len(prefix):]))
}

// maxAccountNameLength bounds a named account's name.
const maxAccountNameLength = 64

// ValidAccountName: 1 to 64 of [A-Za-z0-9._@-], and not dots only (the
// admin API's paths would be cleaned: …/accounts/../…). Case-sensitive.
func ValidAccountName(s string) bool {
	if len(s) == 0 || len(s) > maxAccountNameLength {
		return false
	}
	dotsOnly := true
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c == '.' || c == '_' || c == '@' || c == '-' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
		if !ok {
			return false
		}
		dotsOnly = dotsOnly && c == '.'
	}
	return !dotsOnly
}

// ValidateTenantNames checks the `tenant` declarations of a config.
func ValidateTenantNames(tenants map[string]string) error {
	for name, id := range tenants {
		if !ValidTenantID(id) {
			return fmt.Errorf("tenant %q: %q is not a TenantId (digits, no leading zero)", name, id)
		}
		if name != id && ValidTenantID(name) {
			return fmt.Errorf("tenant alias %q is all digits: it would hide TenantId %s; use a name with a letter", name, name)
		}
		if strings.TrimSpace(name) != name || name == "" {
			return fmt.Errorf("tenant alias %q has surrounding spaces or is empty", name)
		}
	}
	return nil
}
