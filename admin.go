package fortnox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI is the `admin.api.fortnox` module: routes on Caddy's admin
// endpoint to see tenants, hand over refresh tokens and drop tokens.
//
//	GET    /fortnox/tenants
//	PUT    /fortnox/tenants/{tenant}/refresh_token                  {"refresh_token":"…"}
//	DELETE /fortnox/tenants/{tenant}/token
//	PUT    /fortnox/tenants/{tenant}/accounts/{name}/refresh_token  {"refresh_token":"…"}
//	DELETE /fortnox/tenants/{tenant}/accounts/{name}[?revoke=true]
//	POST   /fortnox/refresh_tokens                                   {"refresh_token":"…"}
//	GET    /fortnox/quarantine
//	DELETE /fortnox/quarantine/{id}
//	POST   /fortnox/quarantine/{id}/release
//	POST   /fortnox/export                 (cluster mode: Redis → Caddy's storage)
//	POST   /fortnox/import[?overwrite=true] (cluster mode: Caddy's storage → Redis)
//	POST   /fortnox/encrypt                (rewrite unencrypted records with encryption_key)
//
// With more than one client id loaded, ?client_id= picks one. Errors are
// JSON {"error":"<code>","message":"…"}; no answer ever holds a token.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.fortnox",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/fortnox/", Handler: caddy.AdminHandlerFunc(a.serveHTTP)}}
}

// maxAdminBody bounds admin request bodies.
const maxAdminBody = 64 << 10

// maxRefreshTokenLength: Fortnox's refresh tokens are 40 characters; one
// far longer than that is not a refresh token.
const maxRefreshTokenLength = 1024

// adminError is an admin API answer other than success.
type adminError struct {
	status     int
	code       string
	message    string
	retryAfter time.Duration
}

func (e *adminError) Error() string { return e.message }

// statusOf is the HTTP status an operation failure is answered with.
func statusOf(e *tokens.OpError) int {
	switch e.Kind {
	case tokens.OpToken:
		return e.Token.HttpStatus()
	case tokens.OpInvalid:
		return http.StatusBadRequest
	case tokens.OpNotFound:
		return http.StatusNotFound
	case tokens.OpConflict:
		return http.StatusConflict
	case tokens.OpUnavailable:
		return http.StatusServiceUnavailable
	case tokens.OpBadGateway:
		return http.StatusBadGateway
	}
	return http.StatusInternalServerError
}

// asAdminError is err as the admin routes answer it: an adminError of the
// glue, or an operation failure of the core with the status of its kind.
func asAdminError(err error) (*adminError, bool) {
	var ae *adminError
	if errors.As(err, &ae) {
		return ae, true
	}
	var oe *tokens.OpError
	if errors.As(err, &oe) {
		return &adminError{status: statusOf(oe), code: oe.Code, message: oe.Message, retryAfter: oe.RetryAfter}, true
	}
	return nil, false
}

func apiError(status int, code, format string, args ...any) error {
	return &adminError{status: status, code: code, message: fmt.Sprintf(format, args...)}
}

// serveHTTP writes an adminError as the plugin's JSON error answer; other
// errors go to Caddy's admin server.
func (a adminAPI) serveHTTP(w http.ResponseWriter, r *http.Request) error {
	err := a.serve(w, r)
	if ae, ok := asAdminError(err); ok {
		writeJSONError(w, ae.status, ae.code, ae.message, ae.retryAfter)
		return nil
	}
	return err
}

// adminRoute is a parsed admin request path.
type adminRoute struct {
	name    string
	method  string
	tenant  string
	account string
	id      string
}

func parseAdminRoute(path string) (adminRoute, bool) {
	return parseRoute(strings.TrimPrefix(path, "/fortnox/"))
}

// parseRoute parses a route path below /fortnox/ (fortnox_handover parses
// its paths, already below its mount point, with it too).
func parseRoute(path string) (adminRoute, bool) {
	parts := strings.Split(strings.Trim(path, "/"), "/")
	switch {
	case len(parts) == 1 && parts[0] == "tenants":
		return adminRoute{name: "tenants", method: http.MethodGet}, true
	case len(parts) == 1 && parts[0] == "refresh_tokens":
		return adminRoute{name: "import", method: http.MethodPost}, true
	case len(parts) == 1 && parts[0] == "export":
		return adminRoute{name: "export", method: http.MethodPost}, true
	case len(parts) == 1 && parts[0] == "import":
		return adminRoute{name: "import_records", method: http.MethodPost}, true
	case len(parts) == 1 && parts[0] == "quarantine":
		return adminRoute{name: "quarantine", method: http.MethodGet}, true
	case len(parts) == 1 && parts[0] == "encrypt":
		return adminRoute{name: "encrypt", method: http.MethodPost}, true
	case len(parts) == 2 && parts[0] == "quarantine":
		return adminRoute{name: "quarantine_entry", method: http.MethodDelete, id: parts[1]}, true
	case len(parts) == 3 && parts[0] == "quarantine" && parts[2] == "release":
		return adminRoute{name: "quarantine_release", method: http.MethodPost, id: parts[1]}, true
	case len(parts) == 3 && parts[0] == "tenants" && parts[2] == "refresh_token":
		return adminRoute{name: "refresh_token", method: http.MethodPut, tenant: parts[1]}, true
	case len(parts) == 3 && parts[0] == "tenants" && parts[2] == "token":
		return adminRoute{name: "token", method: http.MethodDelete, tenant: parts[1]}, true
	case len(parts) == 5 && parts[0] == "tenants" && parts[2] == "accounts" && parts[4] == "refresh_token":
		return adminRoute{name: "refresh_token", method: http.MethodPut, tenant: parts[1], account: parts[3]}, true
	case len(parts) == 4 && parts[0] == "tenants" && parts[2] == "accounts":
		return adminRoute{name: "account", method: http.MethodDelete, tenant: parts[1], account: parts[3]}, true
	}
	return adminRoute{}, false
}

func (a adminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	route, ok := parseAdminRoute(r.URL.Path)
	if !ok {
		return apiError(http.StatusNotFound, "no_such_route", "no such route: %s (see GET /fortnox/tenants)", r.URL.Path)
	}
	if err := checkRoute(w, r, route); err != nil {
		return err
	}
	m, err := pickManager(r.URL.Query().Get("client_id"))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(r.Context(), tokens.LockBudget+time.Minute)
	defer cancel()
	subj := tokens.Subject{Tenant: route.tenant, Account: route.account}
	switch route.name {
	case "tenants":
		infos, err := m.Ops().TenantsInfo(ctx)
		if err != nil {
			return apiError(http.StatusInternalServerError, "token_storage_unavailable", "listing tenants: %v", err)
		}
		return writeAdminJSON(w, http.StatusOK, infos)
	case "quarantine":
		rs, err := m.Ops().Records()
		if err != nil {
			return err
		}
		list, err := m.Ops().ListQuarantine(ctx, rs)
		if err != nil {
			return apiError(http.StatusInternalServerError, "token_storage_unavailable", "listing the quarantine: %v", err)
		}
		return writeAdminJSON(w, http.StatusOK, list)
	case "export":
		res, err := m.Ops().ExportRecords(ctx)
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, res)
	case "import_records":
		res, err := m.Ops().ImportRecords(ctx, r.URL.Query().Get("overwrite") == "true")
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, res)
	case "encrypt":
		res, err := m.Ops().EncryptRecords(ctx)
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, res)
	case "quarantine_entry":
		if err := m.Ops().DeleteQuarantine(ctx, route.id); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	case "import":
		rt, err := readRefreshToken(r)
		if err != nil {
			return err
		}
		tenant, err := m.Ops().ImportRefreshToken(ctx, rt)
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, map[string]string{"tenant": tenant})
	case "refresh_token":
		return serveHandOver(ctx, w, r, m, subj, "through the admin API")
	case "quarantine_release":
		owner, err := m.Ops().ReleaseQuarantine(ctx, route.id)
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, map[string]string{"tenant": owner.Tenant, "account": owner.Account})
	case "account":
		if err := m.Ops().DeleteAccount(ctx, subj, r.URL.Query().Get("revoke") == "true"); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	default: // token
		if err := m.Ops().DropToken(ctx, route.tenant); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

// checkRoute checks a parsed route's method, tenant and account name, the
// same way for the admin API and fortnox_handover.
func checkRoute(w http.ResponseWriter, r *http.Request, route adminRoute) error {
	if r.Method != route.method {
		w.Header().Set("Allow", route.method)
		return apiError(http.StatusMethodNotAllowed, "method_not_allowed", "%s %s: use %s", r.Method, r.URL.Path, route.method)
	}
	if route.tenant != "" && !tokens.ValidTenantID(route.tenant) {
		return apiError(http.StatusBadRequest, "invalid_tenant", "%q is not a TenantId (digits, no leading zero)", route.tenant)
	}
	if route.name == "account" || (route.name == "refresh_token" && route.account != "") {
		if !tokens.ValidAccountName(route.account) {
			return apiError(http.StatusBadRequest, "invalid_account", "%q is not an account name: 1 to 64 of A-Z a-z 0-9 . _ @ -, not dots only", route.account)
		}
	}
	return nil
}

// serveHandOver reads {"refresh_token":"…"} and hands it over for subj:
// 204, or the error. The admin API and fortnox_handover both answer with it.
func serveHandOver(ctx context.Context, w http.ResponseWriter, r *http.Request, m *tokens.Manager, subj tokens.Subject, how string) error {
	rt, err := readRefreshToken(r)
	if err != nil {
		return err
	}
	if err := m.Ops().HandOver(ctx, subj, rt, how); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// pickManager finds the token manager for clientID ("" when only one is
// loaded).
func pickManager(clientID string) (*tokens.Manager, error) {
	var all []*tokens.Manager
	managers.Range(func(_, v any) bool {
		all = append(all, v.(*tokens.Manager))
		return true
	})
	if len(all) == 0 {
		return nil, apiError(http.StatusNotFound, "no_handler", "no fortnox handler is loaded")
	}
	if clientID == "" {
		if len(all) > 1 {
			ids := make([]string, len(all))
			for i, m := range all {
				ids[i] = m.ClientID()
			}
			sort.Strings(ids)
			return nil, apiError(http.StatusBadRequest, "client_id_required", "more than one client id is loaded (%s): add ?client_id=", strings.Join(ids, ", "))
		}
		return all[0], nil
	}
	for _, m := range all {
		if m.ClientID() == clientID {
			return m, nil
		}
	}
	return nil, apiError(http.StatusNotFound, "no_handler", "no fortnox handler with client id %q is loaded", clientID)
}

// readRefreshToken reads {"refresh_token":"…"} from an admin request:
// exactly one JSON object, nothing after it, and a token that is one word
// of printable characters no longer than any Fortnox refresh token.
func readRefreshToken(r *http.Request) (string, error) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxAdminBody+1))
	if err != nil {
		return "", apiError(http.StatusBadRequest, "bad_body", "reading the body failed")
	}
	if len(body) > maxAdminBody {
		return "", apiError(http.StatusRequestEntityTooLarge, "body_too_large", "the body is larger than %d bytes", maxAdminBody)
	}
	var in struct {
		RefreshToken *string `json:"refresh_token"`
	}
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		return "", apiError(http.StatusBadRequest, "bad_body", `the body must be JSON: {"refresh_token":"…"}`)
	}
	if _, err := dec.Token(); err != io.EOF {
		return "", apiError(http.StatusBadRequest, "bad_body", `the body must be one JSON object, {"refresh_token":"…"}, with nothing after it`)
	}
	if in.RefreshToken == nil || strings.TrimSpace(*in.RefreshToken) == "" {
		return "", apiError(http.StatusBadRequest, "bad_body", `refresh_token is missing or empty: send {"refresh_token":"…"}`)
	}
	rt := strings.TrimSpace(*in.RefreshToken)
	if len(rt) > maxRefreshTokenLength {
		return "", apiError(http.StatusBadRequest, "bad_refresh_token", "refresh_token is %d characters long: Fortnox's refresh tokens are 40, so this is not one", len(rt))
	}
	for i := 0; i < len(rt); i++ {
		if c := rt[i]; c <= ' ' || c >= 0x7f {
			return "", apiError(http.StatusBadRequest, "bad_refresh_token", "refresh_token holds a space, a control character or a non-ASCII byte (at %d): it is not a refresh token", i)
		}
	}
	return rt, nil
}

func writeAdminJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(v)
}

// Interface guard
var _ caddy.AdminRouter = (*adminAPI)(nil)
