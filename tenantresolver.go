package fortnox

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// maxTenantIDLength bounds a TenantId. Fortnox's are 6-8 digits today;
// 15 leaves room and keeps it an exact integer in a JSON number.
const maxTenantIDLength = 15

// maxJWTLength bounds the app's legacy token we are willing to decode.
// Fortnox tokens are about 3 KB.
const maxJWTLength = 16 << 10

// tenantResolver turns a request into the TenantId it is for.
type tenantResolver struct {
	// header is the canonical form of the tenant header's name, so the hot
	// path can index the header map without canonicalizing (and allocating).
	header string
	// names maps each alias to its TenantId, and each listed TenantId to itself.
	names map[string]string
	// listed holds the TenantIds named by `tenant` (for only_listed_tenants).
	listed     map[string]struct{}
	onlyListed bool
	fromToken  bool
}

// resolveError is a request the resolver refuses: the app's fault.
type resolveError struct {
	status  int
	code    string
	message string
}

func newTenantResolver(header string, tenants map[string]string, onlyListed, fromToken bool) *tenantResolver {
	tr := &tenantResolver{
		header:     http.CanonicalHeaderKey(header),
		names:      make(map[string]string, len(tenants)),
		listed:     make(map[string]struct{}, len(tenants)),
		onlyListed: onlyListed,
		fromToken:  fromToken,
	}
	for name, id := range tenants {
		tr.names[name] = id
		tr.listed[id] = struct{}{}
	}
	return tr
}

// resolve returns the TenantId for r. It does not allocate on success.
func (tr *tenantResolver) resolve(r *http.Request) (string, *resolveError) {
	values := r.Header[tr.header]
	var tenant string
	switch {
	case len(values) > 1:
		return "", &resolveError{http.StatusBadRequest, "ambiguous_tenant",
			"The request has more than one " + tr.header + " header. Send exactly one: the customer's TenantId or a configured alias."}
	case len(values) == 1 && strings.TrimSpace(values[0]) != "":
		id, err := tr.lookup(strings.TrimSpace(values[0]))
		if err != nil {
			return "", err
		}
		tenant = id
	case tr.fromToken:
		id, err := tenantFromBearer(r.Header.Get("Authorization"))
		if err != nil {
			return "", &resolveError{http.StatusBadRequest, "missing_tenant",
				"The request has no " + tr.header + " header, and no tenant could be read from its Authorization header (" + err.Error() + "). Send the customer's TenantId in " + tr.header + "."}
		}
		tenant = id
	default:
		return "", &resolveError{http.StatusBadRequest, "missing_tenant",
			"The request has no " + tr.header + " header. Send the customer's TenantId (or a configured alias) in " + tr.header + "."}
	}
	if tr.onlyListed {
		if _, ok := tr.listed[tenant]; !ok {
			return "", &resolveError{http.StatusForbidden, "tenant_not_allowed",
				"Tenant " + tenant + " is not in this sidecar's list (only_listed_tenants). Add it with `tenant` in the fortnox block if it should be served."}
		}
	}
	return tenant, nil
}

// lookup maps a header value (a TenantId or an alias) to a TenantId.
func (tr *tenantResolver) lookup(v string) (string, *resolveError) {
	if id, ok := tr.names[v]; ok {
		return id, nil
	}
	if validTenantID(v) {
		return v, nil
	}
	return "", &resolveError{http.StatusBadRequest, "invalid_tenant",
		"The " + tr.header + " header is neither a TenantId (digits, no leading zero) nor a configured alias. Send the customer's TenantId, as Fortnox shows it (the DatabaseNumber)."}
}

// validTenantID: 1 to 15 digits, no leading zero (so each tenant has one
// spelling and one cache entry).
func validTenantID(s string) bool {
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

// tenant returns the tenantId claim as a TenantId string. Fortnox sends a
// JSON integer; a numeric string is accepted too.
func (c *jwtClaims) tenant() (string, error) {
	raw := bytes.TrimSpace(c.TenantID)
	if len(raw) == 0 || string(raw) == "null" {
		return "", errors.New("the token has no tenantId claim")
	}
	s := string(bytes.Trim(raw, `"`))
	if !validTenantID(s) {
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

// decodeJWTClaims reads the payload of a JWT without checking its signature.
func decodeJWTClaims(token string) (*jwtClaims, error) {
	if len(token) > maxJWTLength {
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

// tenantFromToken reads the tenantId claim of an access token.
func tenantFromToken(token string) (string, error) {
	c, err := decodeJWTClaims(token)
	if err != nil {
		return "", err
	}
	return c.tenant()
}

// tenantFromBearer reads the tenant from an `Authorization: Bearer <jwt>`
// header: the app's token from before it used the sidecar.
func tenantFromBearer(auth string) (string, error) {
	const prefix = "bearer "
	if len(auth) <= len(prefix) || !strings.EqualFold(auth[:len(prefix)], prefix) {
		return "", errors.New("no Bearer token")
	}
	return tenantFromToken(strings.TrimSpace(auth[len(prefix):]))
}

// maxAccountNameLength bounds a named account's name.
const maxAccountNameLength = 64

// validAccountName: 1 to 64 of [A-Za-z0-9._@-], and not dots only (the
// admin API's paths would be cleaned: …/accounts/../…). Case-sensitive.
func validAccountName(s string) bool {
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

// validateTenantNames checks the `tenant` declarations of a config.
func validateTenantNames(tenants map[string]string) error {
	for name, id := range tenants {
		if !validTenantID(id) {
			return fmt.Errorf("tenant %q: %q is not a TenantId (digits, no leading zero)", name, id)
		}
		if name != id && validTenantID(name) {
			return fmt.Errorf("tenant alias %q is all digits: it would hide TenantId %s; use a name with a letter", name, name)
		}
		if strings.TrimSpace(name) != name || name == "" {
			return fmt.Errorf("tenant alias %q has surrounding spaces or is empty", name)
		}
	}
	return nil
}
