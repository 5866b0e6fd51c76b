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

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI is the `admin.api.fortnox` module: routes on Caddy's admin
// endpoint to see tenants, import refresh tokens and drop tokens.
//
//	GET    /fortnox/tenants
//	PUT    /fortnox/tenants/{tenant}/refresh_token   {"refresh_token":"…"}
//	POST   /fortnox/refresh_tokens                    {"refresh_token":"…"}
//	DELETE /fortnox/tenants/{tenant}/token
//
// With more than one client id loaded, ?client_id= picks one.
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
	return []caddy.AdminRoute{{Pattern: "/fortnox/", Handler: caddy.AdminHandlerFunc(a.serve)}}
}

// maxAdminBody bounds admin request bodies.
const maxAdminBody = 64 << 10

func apiError(status int, format string, args ...any) error {
	return caddy.APIError{HTTPStatus: status, Err: fmt.Errorf(format, args...)}
}

func (a adminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	parts := strings.Split(strings.Trim(strings.TrimPrefix(r.URL.Path, "/fortnox/"), "/"), "/")
	route := ""
	switch {
	case len(parts) == 1 && parts[0] == "tenants":
		route = "tenants"
	case len(parts) == 1 && parts[0] == "refresh_tokens":
		route = "refresh_tokens"
	case len(parts) == 3 && parts[0] == "tenants" && parts[2] == "refresh_token":
		route = "tenant_refresh_token"
	case len(parts) == 3 && parts[0] == "tenants" && parts[2] == "token":
		route = "tenant_token"
	default:
		return apiError(http.StatusNotFound, "no such route: %s (see GET /fortnox/tenants)", r.URL.Path)
	}
	wantMethod := map[string]string{"tenants": http.MethodGet, "refresh_tokens": http.MethodPost,
		"tenant_refresh_token": http.MethodPut, "tenant_token": http.MethodDelete}[route]
	if r.Method != wantMethod {
		w.Header().Set("Allow", wantMethod)
		return apiError(http.StatusMethodNotAllowed, "%s %s: use %s", r.Method, r.URL.Path, wantMethod)
	}
	m, err := pickManager(r.URL.Query().Get("client_id"))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(r.Context(), lockBudget+time.Minute)
	defer cancel()
	switch route {
	case "tenants":
		infos, err := m.tenantsInfo(ctx)
		if err != nil {
			return apiError(http.StatusInternalServerError, "listing tenants: %v", err)
		}
		return writeAdminJSON(w, http.StatusOK, infos)
	case "refresh_tokens":
		rt, err := readRefreshToken(r)
		if err != nil {
			return err
		}
		tenant, err := m.importRefreshToken(ctx, rt)
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, map[string]string{"tenant": tenant})
	case "tenant_refresh_token":
		tenant := parts[1]
		if !validTenantID(tenant) {
			return apiError(http.StatusBadRequest, "%q is not a TenantId (digits, no leading zero)", tenant)
		}
		rt, err := readRefreshToken(r)
		if err != nil {
			return err
		}
		if err := m.putRefreshToken(ctx, tenant, rt); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	default: // tenant_token
		tenant := parts[1]
		if !validTenantID(tenant) {
			return apiError(http.StatusBadRequest, "%q is not a TenantId (digits, no leading zero)", tenant)
		}
		if err := m.dropToken(ctx, tenant); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

// pickManager finds the token manager for clientID ("" when only one is
// loaded).
func pickManager(clientID string) (*tokenManager, error) {
	var all []*tokenManager
	managers.Range(func(_, v any) bool {
		all = append(all, v.(*tokenManager))
		return true
	})
	if len(all) == 0 {
		return nil, apiError(http.StatusNotFound, "no fortnox handler is loaded")
	}
	if clientID == "" {
		if len(all) > 1 {
			ids := make([]string, len(all))
			for i, m := range all {
				ids[i] = m.clientID
			}
			sort.Strings(ids)
			return nil, apiError(http.StatusBadRequest, "more than one client id is loaded (%s): add ?client_id=", strings.Join(ids, ", "))
		}
		return all[0], nil
	}
	for _, m := range all {
		if m.clientID == clientID {
			return m, nil
		}
	}
	return nil, apiError(http.StatusNotFound, "no fortnox handler with client id %q is loaded", clientID)
}

// readRefreshToken reads {"refresh_token":"…"} from an admin request.
func readRefreshToken(r *http.Request) (string, error) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxAdminBody+1))
	if err != nil {
		return "", apiError(http.StatusBadRequest, "reading the body failed")
	}
	if len(body) > maxAdminBody {
		return "", apiError(http.StatusRequestEntityTooLarge, "the body is larger than %d bytes", maxAdminBody)
	}
	var in struct {
		RefreshToken *string `json:"refresh_token"`
	}
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		return "", apiError(http.StatusBadRequest, `the body must be JSON: {"refresh_token":"…"}`)
	}
	if in.RefreshToken == nil || strings.TrimSpace(*in.RefreshToken) == "" {
		return "", apiError(http.StatusBadRequest, `refresh_token is missing or empty: send {"refresh_token":"…"}`)
	}
	rt := strings.TrimSpace(*in.RefreshToken)
	if len(rt) > 4096 || strings.ContainsAny(rt, " \t\r\n") {
		return "", apiError(http.StatusBadRequest, "refresh_token is not a refresh token (one word, at most 4096 characters)")
	}
	return rt, nil
}

func writeAdminJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(v)
}

// records returns the manager's token store, or an admin error when the
// manager has none (not provisioned yet).
func (m *tokenManager) records() (*recordStore, error) {
	s := m.settings.Load()
	if s == nil || s.records == nil {
		return nil, apiError(http.StatusServiceUnavailable, "the token store is not ready")
	}
	return s.records, nil
}

// putRefreshToken stores a refresh token as the tenant's fallback. A
// record this process cannot read (another encryption key) is not
// overwritten.
func (m *tokenManager) putRefreshToken(ctx context.Context, tenant, refreshToken string) error {
	rs, err := m.records()
	if err != nil {
		return err
	}
	err = rs.withLock(ctx, tenant, func() error {
		rec, err := rs.loadOrNew(ctx, tenant)
		if err != nil {
			return err
		}
		rec.RefreshToken = refreshToken
		rec.RejectedAt = time.Time{}
		return rs.saveHard(ctx, rec)
	})
	if errors.Is(err, errRecordUnreadable) {
		return apiError(http.StatusConflict, "%v; nothing was changed (configure the key it was written with, or delete the record from storage)", err)
	}
	if err != nil {
		return apiError(http.StatusInternalServerError, "storing the refresh token: %v", err)
	}
	m.tenantRecovered(tenant)
	m.logger().Info("refresh token stored through the admin API", zap.String("tenant", tenant))
	return nil
}

// tenantRecovered forgets a tenant's failure after a new refresh token.
func (m *tokenManager) tenantRecovered(tenant string) {
	m.mu.Lock()
	st := m.state(tenant)
	st.hasRefreshToken = true
	st.consentRevoked = false
	st.lastError, st.failures, st.retryAt = nil, 0, time.Time{}
	if st.mode == "" {
		st.mode = grantRefreshToken
	}
	m.mu.Unlock()
}

// importRefreshToken uses a refresh token of an unknown tenant once, reads
// the tenant from the new access token and stores the new refresh token
// under it. The old token is dead once Fortnox answers, so the new one is
// stored before anything else, even when no tenant can be read.
func (m *tokenManager) importRefreshToken(ctx context.Context, refreshToken string) (string, error) {
	rs, err := m.records()
	if err != nil {
		return "", err
	}
	s := m.settings.Load()
	rctx, cancel := context.WithTimeout(ctx, s.tokenTimeout)
	defer cancel()
	answer, err := m.client.refresh(rctx, s.cred, refreshToken)
	if err != nil {
		terr := asTokenError(err)
		if terr.failure == failNoConsent {
			return "", apiError(http.StatusBadRequest, "Fortnox rejected the refresh token (%s): it was used already or has expired; the customer must authorize again", terr.Error())
		}
		return "", apiError(http.StatusBadGateway, "Fortnox did not answer the refresh: %s; the refresh token was not used, try again", terr.Error())
	}
	tenant, terr := tenantFromToken(answer.accessToken)
	if terr != nil {
		// Keep the new refresh token somewhere: it is the only live copy.
		key := recordPrefix(m.clientID) + "unassigned/" + now().UTC().Format("20060102T150405.000000000") + ".json"
		raw, _ := rs.encode(key, &tokenRecord{RefreshToken: answer.refreshToken, AccessToken: answer.accessToken, UpdatedAt: now().UTC()})
		if err := rs.storage.Store(ctx, key, raw); err != nil {
			m.logger().Error("a new refresh token of an unknown tenant could not be stored", zap.Error(err))
		}
		return "", apiError(http.StatusBadGateway, "the new access token carries no tenantId (%v); the new refresh token was stored at %s in Caddy's storage", terr, key)
	}
	issued := now()
	err = rs.withLock(ctx, tenant, func() error {
		rec, err := rs.loadOrNew(ctx, tenant)
		if err != nil {
			return err
		}
		rec.RefreshToken = answer.refreshToken
		rec.AccessToken = answer.accessToken
		rec.IssuedAt, rec.ExpiresAt = issued.UTC(), issued.Add(answer.lifetime).UTC()
		rec.RejectedAt = time.Time{}
		return rs.saveHard(ctx, rec)
	})
	if err != nil {
		m.keepUnsaved(tenant, &tokenRecord{Tenant: tenant, Mode: grantRefreshToken, RefreshToken: answer.refreshToken,
			AccessToken: answer.accessToken, IssuedAt: issued.UTC(), ExpiresAt: issued.Add(answer.lifetime).UTC()})
		m.logger().Error("THE NEW REFRESH TOKEN COULD NOT BE SAVED: kept in memory until storage works", zap.String("tenant", tenant), zap.Error(err))
		return "", apiError(http.StatusInternalServerError, "storing the refresh token for tenant %s failed (%v); it is kept in memory and saved on the tenant's next token request", tenant, err)
	}
	m.cacheToken(tenant, grantRefreshToken, answer.accessToken, issued, answer.lifetime, s.refreshBefore)
	m.tenantRecovered(tenant)
	m.logger().Info("refresh token imported through the admin API", zap.String("tenant", tenant))
	return tenant, nil
}

// dropToken drops the tenant's access token, cached and stored, so that
// the next request gets a new one.
func (m *tokenManager) dropToken(ctx context.Context, tenant string) error {
	rs, err := m.records()
	if err != nil {
		return err
	}
	_, cached := m.cache.Get(tenant)
	m.mu.Lock()
	_, known := m.tenants[tenant]
	m.mu.Unlock()
	stored := false
	err = rs.withLock(ctx, tenant, func() error {
		rec, err := rs.load(ctx, tenant)
		if err != nil || rec == nil {
			return err
		}
		stored = true
		if rec.AccessToken == "" {
			return nil
		}
		rec.AccessToken, rec.IssuedAt, rec.ExpiresAt = "", time.Time{}, time.Time{}
		return rs.save(ctx, rec)
	})
	if errors.Is(err, errRecordUnreadable) {
		return apiError(http.StatusConflict, "%v; nothing was changed", err)
	}
	if err != nil {
		return apiError(http.StatusInternalServerError, "dropping the stored token: %v", err)
	}
	if !cached && !known && !stored {
		return apiError(http.StatusNotFound, "tenant %s is not known", tenant)
	}
	m.invalidate(tenant, nil)
	return nil
}

// tenantInfo is one row of GET /fortnox/tenants. Never a token.
type tenantInfo struct {
	Tenant          string     `json:"tenant"`
	Mode            string     `json:"mode"`
	TokenExpiresAt  *time.Time `json:"token_expires_at"`
	HasRefreshToken bool       `json:"has_refresh_token"`
	LastError       *string    `json:"last_error"`
}

// tenantsInfo lists every tenant known in memory or in storage.
func (m *tokenManager) tenantsInfo(ctx context.Context) ([]tenantInfo, error) {
	rs, err := m.records()
	if err != nil {
		return nil, err
	}
	rows := map[string]*tenantInfo{}
	row := func(tenant string) *tenantInfo {
		if r := rows[tenant]; r != nil {
			return r
		}
		r := &tenantInfo{Tenant: tenant, Mode: "none"}
		rows[tenant] = r
		return r
	}
	stored, err := rs.tenants(ctx)
	if err != nil {
		return nil, err
	}
	for _, tenant := range stored {
		r := row(tenant)
		rec, err := rs.load(ctx, tenant)
		if err != nil {
			msg := err.Error()
			r.LastError = &msg
			continue
		}
		if rec == nil {
			continue
		}
		r.HasRefreshToken = rec.RefreshToken != "" && rec.RejectedAt.IsZero()
		if rec.Mode != "" {
			r.Mode = rec.Mode
		}
		if rec.AccessToken != "" && rec.ExpiresAt.After(now()) {
			exp := rec.ExpiresAt.UTC()
			r.TokenExpiresAt = &exp
		}
	}
	m.mu.Lock()
	for tenant, st := range m.tenants {
		r := row(tenant)
		if st.mode != "" {
			r.Mode = st.mode
		}
		if st.hasRefreshToken {
			r.HasRefreshToken = st.lastError == nil || st.lastError.failure != failGrantRejected
		}
		if st.lastError != nil {
			msg := st.lastError.errorCode() + ": " + st.lastError.Error()
			r.LastError = &msg
		}
	}
	m.mu.Unlock()
	for tenant, item := range m.cache.Items() {
		t := item.Object.(*cachedToken)
		if t.usableAt(now().UnixNano()) {
			r := row(tenant)
			exp := t.expiry().UTC()
			r.TokenExpiresAt = &exp
			if r.Mode == "none" {
				r.Mode = t.grant
			}
		}
	}
	out := make([]tenantInfo, 0, len(rows))
	for _, r := range rows {
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Tenant < out[j].Tenant })
	return out, nil
}

// Interface guard
var _ caddy.AdminRouter = (*adminAPI)(nil)
