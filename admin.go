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

// opError is an operation's failure as the core says it: its kind, a
// stable code and a message that says what to do. The admin routes answer
// it with the status of its kind (statusOf).
type opError struct {
	kind       opKind
	code       string
	message    string
	retryAfter time.Duration
	// token: the token endpoint's failure, for opToken.
	token *tokenError
}

func (e *opError) Error() string { return e.message }

// opKind is what went wrong in an operation, in the core's words.
type opKind int

// Kinds of operation failures.
const (
	opInvalid     opKind = iota + 1 // the request cannot be done as asked
	opNotFound                      // there is nothing of that name
	opConflict                      // what is stored stands in the way
	opStorage                       // the token store failed
	opUnavailable                   // Fortnox or the shared store did not answer; retry
	opBadGateway                    // Fortnox answered with something unusable
	opToken                         // the token endpoint failed as token says
)

func opErrorf(kind opKind, code, format string, args ...any) error {
	return &opError{kind: kind, code: code, message: fmt.Sprintf(format, args...)}
}

// statusOf is the HTTP status an operation failure is answered with.
func statusOf(e *opError) int {
	switch e.kind {
	case opToken:
		return e.token.httpStatus()
	case opInvalid:
		return http.StatusBadRequest
	case opNotFound:
		return http.StatusNotFound
	case opConflict:
		return http.StatusConflict
	case opUnavailable:
		return http.StatusServiceUnavailable
	case opBadGateway:
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
	var oe *opError
	if errors.As(err, &oe) {
		return &adminError{status: statusOf(oe), code: oe.code, message: oe.message, retryAfter: oe.retryAfter}, true
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
	ctx, cancel := context.WithTimeout(r.Context(), lockBudget+time.Minute)
	defer cancel()
	subj := subject{tenant: route.tenant, account: route.account}
	switch route.name {
	case "tenants":
		infos, err := m.tenantsInfo(ctx)
		if err != nil {
			return apiError(http.StatusInternalServerError, "token_storage_unavailable", "listing tenants: %v", err)
		}
		return writeAdminJSON(w, http.StatusOK, infos)
	case "quarantine":
		rs, err := m.records()
		if err != nil {
			return err
		}
		list, err := m.listQuarantine(ctx, rs)
		if err != nil {
			return apiError(http.StatusInternalServerError, "token_storage_unavailable", "listing the quarantine: %v", err)
		}
		return writeAdminJSON(w, http.StatusOK, list)
	case "export":
		res, err := m.exportRecords(ctx)
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, res)
	case "import_records":
		res, err := m.importRecords(ctx, r.URL.Query().Get("overwrite") == "true")
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, res)
	case "encrypt":
		res, err := m.encryptRecords(ctx)
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, res)
	case "quarantine_entry":
		if err := m.deleteQuarantine(ctx, route.id); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	case "import":
		rt, err := readRefreshToken(r)
		if err != nil {
			return err
		}
		tenant, err := m.importRefreshToken(ctx, rt)
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, map[string]string{"tenant": tenant})
	case "refresh_token":
		return serveHandOver(ctx, w, r, m, subj, "through the admin API")
	case "quarantine_release":
		owner, err := m.releaseQuarantine(ctx, route.id)
		if err != nil {
			return err
		}
		return writeAdminJSON(w, http.StatusOK, map[string]string{"tenant": owner.tenant, "account": owner.account})
	case "account":
		if err := m.deleteAccount(ctx, subj, r.URL.Query().Get("revoke") == "true"); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	default: // token
		if err := m.dropToken(ctx, route.tenant); err != nil {
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
	if route.tenant != "" && !validTenantID(route.tenant) {
		return apiError(http.StatusBadRequest, "invalid_tenant", "%q is not a TenantId (digits, no leading zero)", route.tenant)
	}
	if route.name == "account" || (route.name == "refresh_token" && route.account != "") {
		if !validAccountName(route.account) {
			return apiError(http.StatusBadRequest, "invalid_account", "%q is not an account name: 1 to 64 of A-Z a-z 0-9 . _ @ -, not dots only", route.account)
		}
	}
	return nil
}

// serveHandOver reads {"refresh_token":"…"} and hands it over for subj:
// 204, or the error. The admin API and fortnox_handover both answer with it.
func serveHandOver(ctx context.Context, w http.ResponseWriter, r *http.Request, m *tokenManager, subj subject, how string) error {
	rt, err := readRefreshToken(r)
	if err != nil {
		return err
	}
	if err := m.handOver(ctx, subj, rt, how); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
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
		return nil, apiError(http.StatusNotFound, "no_handler", "no fortnox handler is loaded")
	}
	if clientID == "" {
		if len(all) > 1 {
			ids := make([]string, len(all))
			for i, m := range all {
				ids[i] = m.clientID
			}
			sort.Strings(ids)
			return nil, apiError(http.StatusBadRequest, "client_id_required", "more than one client id is loaded (%s): add ?client_id=", strings.Join(ids, ", "))
		}
		return all[0], nil
	}
	for _, m := range all {
		if m.clientID == clientID {
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

// records returns the manager's token store, or an admin error when the
// manager has none (not provisioned yet).
func (m *tokenManager) records() (*recordStore, error) {
	s := m.settings.Load()
	if s == nil || s.records == nil {
		return nil, opErrorf(opUnavailable, "not_ready", "the token store is not ready")
	}
	return s.records, nil
}

// adminStoreError answers a store failure without changing anything.
func adminStoreError(what string, err error) error {
	switch {
	case errors.Is(err, errRecordMisplaced):
		return opErrorf(opConflict, "tenant_mismatch", "%v; nothing was changed", err)
	case recordRefusalAdvice(err, "") != "": // its text says what to do
		return opErrorf(opConflict, "record_unreadable", "%v; nothing was changed", err)
	case errors.Is(err, errRecordUnreadable):
		return opErrorf(opConflict, "record_unreadable", "%v; nothing was changed (configure the key it was written with, or delete the record from storage)", err)
	}
	return opErrorf(opStorage, "token_storage_unavailable", "%s: %v", what, err)
}

// adminTokenError answers a failed refresh of a handed-over token.
func adminTokenError(subj subject, terr *tokenError) error {
	terr = withAccount(terr, subj)
	switch terr.failure {
	case failNoConsent, failGrantRejected:
		return opErrorf(opInvalid, "refresh_token_rejected", "Fortnox rejected the refresh token (%s): it was used already, revoked or has expired; nothing was stored. The customer must authorize again", terr.Error())
	case failTenantMismatch, failUserMismatch:
		return opErrorf(opConflict, terr.errorCode(), "%s", terr.advice(subj.tenant))
	case failUnavailable:
		retry := time.Duration(retryAfterSeconds(terr.retryAt, clk.Now())) * time.Second
		return &opError{kind: opUnavailable, code: terr.errorCode(), retryAfter: retry,
			message: "Fortnox did not answer the refresh (" + terr.Error() + "). If the request reached Fortnox, its answer was stored; otherwise the refresh token was not used. Check GET /fortnox/tenants, and retry with the same token if it is not there."}
	}
	return &opError{kind: opToken, token: terr, code: terr.errorCode(), message: terr.Error() + ": " + terr.advice(subj.tenant)}
}

// handOver spends a refresh token once to learn whose it is, and stores
// the new one under subj when the new access token names subj's tenant
// (and, for a named account bound to a user, that user). A token that is
// another tenant's (or user's) is never stored under subj, nor under its
// own tenant: its new refresh token goes to the quarantine (409). Once the
// token is sent, nothing cancels the exchange: not the client leaving, not
// a reload. The answer is stored first. how says where it came from, for
// the log.
func (m *tokenManager) handOver(ctx context.Context, subj subject, refreshToken, how string) error {
	rs, err := m.records()
	if err != nil {
		return err
	}
	s := m.settings.Load()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), lockBudget+refreshCallLimit+time.Minute)
	defer cancel()
	var kept keptAnswer
	err = rs.withLock(ctx, subj, func() error {
		// A record that cannot be read or belongs elsewhere is not
		// touched, so the token is not spent either.
		rec, err := rs.loadOrNew(ctx, subj)
		if err != nil {
			return err
		}
		answer, took, stored, err := m.spendRefreshToken(s, refreshToken)
		defer stored()
		if err != nil {
			terr := asTokenError(err)
			metricsTokenRequest(grantRefreshToken, terr.errorCode(), took)
			kept.failure = adminTokenError(subj, terr)
			return nil
		}
		metricsTokenRequest(grantRefreshToken, "ok", took)
		kept = m.keepAnswerFor(ctx, s, subj, rec, answer)
		return nil
	})
	if err != nil {
		return adminStoreError("storing the refresh token", err)
	}
	return m.finishHandOver(subj, kept, how)
}

// storeAnswer stores a code exchange's answer under subj, as handOver
// stores a refresh answer: only when it is subj's. The code is spent, so
// the answer is never lost: a record that cannot be written to goes to
// quarantine.
func (m *tokenManager) storeAnswer(ctx context.Context, subj subject, answer *tokenAnswer) error {
	rs, err := m.records()
	if err != nil {
		return err
	}
	s := m.settings.Load()
	var kept keptAnswer
	err = rs.withLock(ctx, subj, func() error {
		rec, err := rs.loadOrNew(ctx, subj)
		if err != nil {
			return err
		}
		kept = m.keepAnswerFor(ctx, s, subj, rec, answer)
		return nil
	})
	if err != nil {
		terr := &tokenError{failure: failStorage, tenant: subj.tenant, cause: err}
		where := "lost"
		if st := m.quarantineAnswer(ctx, s, subj, answer, terr); st != nil {
			where = quarantinedWhere(st)
		}
		return opErrorf(opStorage, "token_storage_unavailable", "the record of %s could not be used (%v); the new refresh token was %s", subj, err, where)
	}
	return m.finishHandOver(subj, kept, "from a connection")
}

// keptAnswer is what became of a handed-over answer.
type keptAnswer struct {
	stranded *strandedToken // another tenant's (or user's): in quarantine
	mismatch *tokenError
	failure  error
}

// keepAnswerFor stores an answer under subj if it is subj's, under subj's
// lock (held by the caller), or quarantines it.
func (m *tokenManager) keepAnswerFor(ctx context.Context, s *managerSettings, subj subject, rec *tokenRecord, answer *tokenAnswer) keptAnswer {
	if terr := checkTokenBinding(answer.accessToken, subj, grantRefreshToken, rec.UserID); terr != nil {
		return keptAnswer{stranded: m.quarantineAnswer(ctx, s, subj, answer, terr), mismatch: terr}
	}
	var kept keptAnswer
	issued := clk.Now()
	m.keepAnswer(rec, answer, issued, subj)
	if subj.account == "" {
		rec.ConsentRevokedAt = time.Time{}
	}
	if err := m.storeRotated(ctx, s, subj, rec); err != nil {
		kept.failure = opErrorf(opStorage, "token_storage_unavailable", "storing the new refresh token for %s failed (%v); it is kept in memory and saved on the next token request", subj, err)
	}
	if subj.account != "" {
		m.cacheToken(subj, grantRefreshToken, answer.accessToken, issued, answer.lifetime, s.refreshBefore)
	}
	return kept
}

// finishHandOver answers a hand-over after the lock is released. A
// mismatched token stays in the quarantine: it is not served under subj,
// nor under its own tenant until an operator releases it.
func (m *tokenManager) finishHandOver(subj subject, kept keptAnswer, how string) error {
	if kept.mismatch != nil {
		kept.mismatch.handedOver = true
		if kept.stranded != nil {
			kept.mismatch.detail = "The new refresh token Fortnox returned was " + quarantinedWhere(kept.stranded) + "; nothing was stored for " + subj.String() + "."
		}
		m.logger().Error("a refresh token handed over "+how+" is not the tenant's (or user's): not stored under it",
			append(subj.logFields(), zap.String("token_tenant", kept.mismatch.tokenTenant), zap.String("error", kept.mismatch.Error()))...)
		return adminTokenError(subj, kept.mismatch)
	}
	if kept.failure != nil {
		return kept.failure
	}
	m.tenantRecovered(subj)
	m.logger().Info("refresh token stored "+how, subj.logFields()...)
	return nil
}

// tenantRecovered forgets a subject's failure after a new refresh token,
// here and in every sidecar.
func (m *tokenManager) tenantRecovered(subj subject) {
	m.noteRecovered(subj)
	m.notifyChainRestored(subj)
	m.tell(event{Kind: eventRecovered, Tenant: subj.tenant, Account: subj.account})
}

// noteRecovered is tenantRecovered in this process's memory.
func (m *tokenManager) noteRecovered(subj subject) {
	m.mu.Lock()
	st := m.state(subj.key())
	st.hasRefreshToken = true
	st.lastError, st.failures, st.retryAt, st.unknown, st.rejected = nil, 0, time.Time{}, false, ""
	if subj.account == "" {
		st.consentRevoked, st.revocationRead = false, true
	}
	if st.mode == "" || subj.account != "" {
		st.mode = grantRefreshToken
	}
	m.mu.Unlock()
}

// importRefreshToken uses a refresh token of an unknown tenant once, reads
// the tenant from the new access token and stores the new refresh token
// under it. The old token is dead once Fortnox answers, so the new one is
// stored before anything else: in quarantine when no tenant can be read.
func (m *tokenManager) importRefreshToken(ctx context.Context, refreshToken string) (string, error) {
	rs, err := m.records()
	if err != nil {
		return "", err
	}
	s := m.settings.Load()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), lockBudget+refreshCallLimit+time.Minute)
	defer cancel()
	answer, took, stored, err := m.spendRefreshToken(s, refreshToken)
	defer stored()
	if err != nil {
		terr := asTokenError(err)
		metricsTokenRequest(grantRefreshToken, terr.errorCode(), took)
		return "", adminTokenError(subject{}, terr)
	}
	metricsTokenRequest(grantRefreshToken, "ok", took)
	tenant, terr := tenantFromToken(answer.accessToken)
	if terr != nil {
		mismatch := &tokenError{failure: failTenantMismatch, cause: fmt.Errorf("Fortnox's token names no tenant (%v)", terr)}
		where := "lost"
		if st := m.quarantineAnswer(ctx, s, subject{}, answer, mismatch); st != nil {
			where = quarantinedWhere(st)
		}
		return "", opErrorf(opBadGateway, "bad_token_response", "the new access token carries no tenantId (%v), so the tenant is unknown; the new refresh token was %s", terr, where)
	}
	subj := subject{tenant: tenant}
	issued := clk.Now()
	err = rs.withLock(ctx, subj, func() error {
		rec, err := rs.loadOrNew(ctx, subj)
		if err != nil {
			return err
		}
		m.keepAnswer(rec, answer, issued, subj)
		rec.ConsentRevokedAt = time.Time{}
		return rs.saveHard(ctx, subj, rec)
	})
	if err != nil {
		rec := &tokenRecord{Mode: grantRefreshToken}
		m.keepAnswer(rec, answer, issued, subj)
		m.keepUnsaved(subj, rec)
		m.logger().Error("THE NEW REFRESH TOKEN COULD NOT BE SAVED: kept in memory until storage works", zap.String("tenant", tenant), zap.Error(err))
		return "", opErrorf(opStorage, "token_storage_unavailable", "storing the refresh token for tenant %s failed (%v); it is kept in memory and saved on the tenant's next token request", tenant, err)
	}
	m.drop(subj, nil)
	m.cacheToken(subj, grantRefreshToken, answer.accessToken, issued, answer.lifetime, s.refreshBefore)
	m.tenantRecovered(subj)
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
	subj := subject{tenant: tenant}
	_, cached := m.cache.Get(tenant)
	m.mu.Lock()
	_, known := m.tenants[tenant]
	m.mu.Unlock()
	stored := false
	err = rs.withLock(ctx, subj, func() error {
		rec, err := rs.load(ctx, subj)
		if err != nil || rec == nil {
			return err
		}
		stored = true
		if rec.AccessToken == "" {
			return nil
		}
		rec.AccessToken, rec.IssuedAt, rec.ExpiresAt = "", time.Time{}, time.Time{}
		return rs.save(ctx, subj, rec)
	})
	if err != nil {
		return adminStoreError("dropping the stored token", err)
	}
	if !cached && !known && !stored {
		return opErrorf(opNotFound, "unknown_tenant", "tenant %s is not known", tenant)
	}
	m.drop(subj, nil)
	if v, ok := m.cache.Get(tenant); ok {
		_ = m.shared().dropToken(ctx, subj, v.(*cachedToken).accessToken())
	}
	if c := m.cluster.Load(); c != nil {
		_ = c.dropAnyToken(ctx, subj)
	}
	m.tell(event{Kind: eventDropped, Tenant: tenant})
	return nil
}

// deleteAccount forgets a named account: its record, its cached token and
// its state. With revoke, its refresh token is first revoked at Fortnox; if
// that fails, nothing is deleted.
func (m *tokenManager) deleteAccount(ctx context.Context, subj subject, revoke bool) error {
	rs, err := m.records()
	if err != nil {
		return err
	}
	s := m.settings.Load()
	found := false
	var revokeErr error
	err = rs.withLock(ctx, subj, func() error {
		rec, err := rs.load(ctx, subj)
		if err != nil || rec == nil {
			return err
		}
		found = true
		if revoke && rec.liveRefreshToken() {
			rctx, cancel := context.WithTimeout(ctx, s.tokenTimeout)
			revokeErr = m.client.revoke(rctx, s.cred, rec.RefreshToken)
			cancel()
			if revokeErr != nil {
				return nil
			}
		}
		return rs.storage.Delete(ctx, recordKey(m.clientID, subj))
	})
	if err != nil {
		return adminStoreError("deleting the account", err)
	}
	if revokeErr != nil {
		terr := asTokenError(revokeErr)
		return &opError{kind: opToken, token: terr, code: "revoke_failed", retryAfter: time.Second,
			message: "Fortnox did not revoke the account's refresh token (" + terr.Error() + "); nothing was deleted: try again, or delete without ?revoke=true"}
	}
	m.mu.Lock()
	_, known := m.tenants[subj.key()]
	m.mu.Unlock()
	m.forget(subj)
	if c := m.cluster.Load(); c != nil {
		_ = c.dropAnyToken(ctx, subj)
	}
	m.tell(event{Kind: eventForget, Tenant: subj.tenant, Account: subj.account})
	if !found && !known {
		return opErrorf(opNotFound, "unknown_account", "%s is not known", subj)
	}
	m.logger().Info("account deleted through the admin API", append(subj.logFields(), zap.Bool("revoked", revoke))...)
	return nil
}

// deleteQuarantine removes a quarantine record.
func (m *tokenManager) deleteQuarantine(ctx context.Context, id string) error {
	rs, err := m.records()
	if err != nil {
		return err
	}
	if !validQuarantineID(id) {
		return opErrorf(opInvalid, "invalid_id", "%q is not a quarantine id (see GET /fortnox/quarantine)", id)
	}
	if _, err := m.loadQuarantine(ctx, rs, id); err != nil {
		return opErrorf(opNotFound, "unknown_id", "no quarantine record %s", id)
	}
	if err := rs.storage.Delete(ctx, quarantineKey(m.clientID, id)); err != nil {
		return adminStoreError("deleting the quarantine record", storageError("deleting", quarantineKey(m.clientID, id), err))
	}
	m.logger().Info("quarantine record deleted through the admin API", zap.String("quarantine_id", id))
	return nil
}

// tenantInfo is one row of GET /fortnox/tenants. Never a token.
type tenantInfo struct {
	Tenant          string     `json:"tenant"`
	Mode            string     `json:"mode"`
	TokenExpiresAt  *time.Time `json:"token_expires_at"`
	HasRefreshToken bool       `json:"has_refresh_token"`
	LastError       *string    `json:"last_error"`
	// RefreshTokenAge: seconds since the stored refresh token was issued
	// (Fortnox's die after 45 days unused); null when unknown or none.
	RefreshTokenAge *int64        `json:"refresh_token_age_seconds"`
	ConsentRevoked  bool          `json:"consent_revoked"`
	Accounts        []accountInfo `json:"accounts"`
	// Quarantined: refresh tokens of this tenant that were handed over for
	// another (or for an account bound to another user), kept and served
	// under no name until an operator releases or deletes them.
	Quarantined []quarantinedInfo `json:"quarantined"`
}

// quarantinedInfo is a quarantine record in a tenantInfo row. Never a token.
type quarantinedInfo struct {
	ID string `json:"id"`
	// Account is the named account it was handed over as; "" for the
	// tenant's service account.
	Account string `json:"account"`
	// HandedOverFor is the tenant it was handed over for.
	HandedOverFor string    `json:"handed_over_for"`
	At            time.Time `json:"at"`
}

// accountInfo is a named user account in a tenantInfo row. Never a token.
type accountInfo struct {
	Name            string     `json:"name"`
	UserID          *string    `json:"user_id"`
	TokenExpiresAt  *time.Time `json:"token_expires_at"`
	HasRefreshToken bool       `json:"has_refresh_token"`
	LastError       *string    `json:"last_error"`
	RefreshTokenAge *int64     `json:"refresh_token_age_seconds"`
}

// subjectInfo is what tenant and account rows share while they are built.
type subjectInfo struct {
	mode            string
	expiresAt       *time.Time
	hasRefreshToken bool
	lastError       *string
	refreshAge      *int64
	userID          *string
	revoked         bool
}

// tenantsInfo lists every tenant (and named account) known in memory or
// in storage.
func (m *tokenManager) tenantsInfo(ctx context.Context) ([]tenantInfo, error) {
	rs, err := m.records()
	if err != nil {
		return nil, err
	}
	n := clk.Now()
	rows := map[subject]*subjectInfo{}
	row := func(subj subject) *subjectInfo {
		if r := rows[subj]; r != nil {
			return r
		}
		r := &subjectInfo{mode: "none"}
		rows[subj] = r
		return r
	}
	stored, err := rs.subjects(ctx)
	if err != nil {
		return nil, err
	}
	for _, subj := range stored {
		r := row(subj)
		rec, err := rs.load(ctx, subj)
		if err != nil {
			msg := asStorageError(err).errorCode() + ": " + err.Error()
			r.lastError = &msg
			continue
		}
		if rec == nil {
			continue
		}
		r.hasRefreshToken = rec.liveRefreshToken()
		if r.hasRefreshToken && !rec.RefreshTokenAt.IsZero() {
			age := int64(n.Sub(rec.RefreshTokenAt) / time.Second)
			r.refreshAge = &age
		}
		if rec.Mode != "" {
			r.mode = rec.Mode
		}
		if rec.UserID != "" {
			r.userID = &rec.UserID
		}
		r.revoked = !rec.ConsentRevokedAt.IsZero()
		if rec.AccessToken != "" && rec.ExpiresAt.After(n) {
			exp := rec.ExpiresAt.UTC()
			r.expiresAt = &exp
		}
		if rec.MismatchTenant != "" && rec.RefreshToken == "" {
			msg := noRefreshToken(subj, rec).errorCode() + ": " + noRefreshToken(subj, rec).advice(subj.tenant)
			r.lastError = &msg
		}
	}
	m.mu.Lock()
	for key, st := range m.tenants {
		tenant, account, _ := strings.Cut(key, "/")
		r := row(subject{tenant: tenant, account: account})
		if st.mode != "" {
			r.mode = st.mode
		}
		if st.hasRefreshToken {
			r.hasRefreshToken = st.lastError == nil || st.lastError.failure != failGrantRejected
		}
		if st.consentRevoked {
			r.revoked = true
		}
		if st.lastError != nil {
			msg := st.lastError.errorCode() + ": " + st.lastError.Error()
			r.lastError = &msg
		}
	}
	m.mu.Unlock()
	for key, item := range m.cache.Items() {
		t := item.Object.(*cachedToken)
		if t.usableAt(n.UnixNano()) {
			tenant, account, _ := strings.Cut(key, "/")
			r := row(subject{tenant: tenant, account: account})
			exp := t.expiry().UTC()
			r.expiresAt = &exp
			if r.mode == "none" {
				r.mode = t.grant
			}
		}
	}
	byTenant := map[string]*tenantInfo{}
	tenantRow := func(tenant string) *tenantInfo {
		t := byTenant[tenant]
		if t == nil {
			t = &tenantInfo{Tenant: tenant, Mode: "none", Accounts: []accountInfo{}, Quarantined: []quarantinedInfo{}}
			byTenant[tenant] = t
		}
		return t
	}
	quarantined, err := m.listQuarantine(ctx, rs)
	if err != nil {
		return nil, err
	}
	for _, q := range quarantined {
		// A token that names no tenant belongs to none: GET
		// /fortnox/quarantine lists it.
		if q.Tenant == nil || !validTenantID(*q.Tenant) {
			continue
		}
		t := tenantRow(*q.Tenant)
		t.Quarantined = append(t.Quarantined, quarantinedInfo{ID: q.ID, Account: ptrText(q.Account),
			HandedOverFor: q.SubmittedFor, At: q.CreatedAt.UTC().Truncate(time.Second)})
	}
	for subj, r := range rows {
		t := tenantRow(subj.tenant)
		if subj.account == "" {
			t.Mode, t.TokenExpiresAt, t.HasRefreshToken, t.LastError = r.mode, r.expiresAt, r.hasRefreshToken, r.lastError
			t.RefreshTokenAge, t.ConsentRevoked = r.refreshAge, r.revoked
			continue
		}
		t.Accounts = append(t.Accounts, accountInfo{Name: subj.account, UserID: r.userID, TokenExpiresAt: r.expiresAt,
			HasRefreshToken: r.hasRefreshToken, LastError: r.lastError, RefreshTokenAge: r.refreshAge})
	}
	out := make([]tenantInfo, 0, len(byTenant))
	for _, t := range byTenant {
		sort.Slice(t.Accounts, func(i, j int) bool { return t.Accounts[i].Name < t.Accounts[j].Name })
		out = append(out, *t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Tenant < out[j].Tenant })
	return out, nil
}

// ptrText is *p, or "" for nil.
func ptrText(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// Interface guard
var _ caddy.AdminRouter = (*adminAPI)(nil)
