package fortnox

import (
	"net/http"
	"strings"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
)

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
		id, err := tokens.TenantFromBearer(r.Header.Get("Authorization"))
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
	if tokens.ValidTenantID(v) {
		return v, nil
	}
	return "", &resolveError{http.StatusBadRequest, "invalid_tenant",
		"The " + tr.header + " header is neither a TenantId (digits, no leading zero) nor a configured alias. Send the customer's TenantId, as Fortnox shows it (the DatabaseNumber)."}
}
