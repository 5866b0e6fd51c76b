package tokens

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"go.uber.org/zap"
)

// OpError is an operation's failure as the core says it: its kind, a
// stable code and a message that says what to do. The admin routes answer
// it with the status of its kind (statusOf).
type OpError struct {
	Kind       OpKind
	Code       string
	Message    string
	RetryAfter time.Duration
	// token: the token endpoint's failure, for opToken.
	Token *Error
}

func (e *OpError) Error() string { return e.Message }

// OpKind is what went wrong in an operation, in the core's words.
type OpKind int

// Kinds of operation failures.
const (
	OpInvalid     OpKind = iota + 1 // the request cannot be done as asked
	OpNotFound                      // there is nothing of that name
	OpConflict                      // what is stored stands in the way
	OpStorage                       // the token store failed
	OpUnavailable                   // Fortnox or the shared store did not answer; retry
	OpBadGateway                    // Fortnox answered with something unusable
	OpToken                         // the token endpoint failed as token says
)

func opErrorf(kind OpKind, code, format string, args ...any) error {
	return &OpError{Kind: kind, Code: code, Message: fmt.Sprintf(format, args...)}
}

// Ops are the operator's operations on a manager's tokens and records
// (the admin API, the CLI, the connect and hand-over handlers): hand-over,
// import, drop, delete, list, quarantine, export/import, encrypt. They
// fail with *OpError, which the glue maps to its answers.
type Ops struct{ m *Manager }

// Ops is the operator's view of m.
func (m *Manager) Ops() Ops { return Ops{m} }

// Records returns the manager's token store, or an operation failure when
// the manager has none (not provisioned yet).
func (o Ops) Records() (*Records, error) {
	m := o.m
	s := m.Settings.Load()
	if s == nil || s.Records == nil {
		return nil, opErrorf(OpUnavailable, "not_ready", "the token store is not ready")
	}
	return s.Records, nil
}

// adminStoreError answers a store failure without changing anything.
func adminStoreError(what string, err error) error {
	switch {
	case errors.Is(err, errRecordMisplaced):
		return opErrorf(OpConflict, "tenant_mismatch", "%v; nothing was changed", err)
	case recordRefusalAdvice(err, "") != "": // its text says what to do
		return opErrorf(OpConflict, "record_unreadable", "%v; nothing was changed", err)
	case errors.Is(err, errRecordUnreadable):
		return opErrorf(OpConflict, "record_unreadable", "%v; nothing was changed (configure the key it was written with, or delete the record from storage)", err)
	}
	return opErrorf(OpStorage, "token_storage_unavailable", "%s: %v", what, err)
}

// adminTokenError answers a failed refresh of a handed-over token.
func adminTokenError(subj Subject, terr *Error, at time.Time) error {
	terr = WithAccount(terr, subj)
	switch terr.Failure {
	case FailNoConsent, FailGrantRejected:
		return opErrorf(OpInvalid, "refresh_token_rejected", "Fortnox rejected the refresh token (%s): it was used already, revoked or has expired; nothing was stored. The customer must authorize again", terr.Error())
	case FailTenantMismatch, FailUserMismatch:
		return opErrorf(OpConflict, terr.ErrorCode(), "%s", terr.Advice(subj.Tenant))
	case FailUnavailable:
		retry := time.Duration(RetryAfterSeconds(terr.RetryAt, at)) * time.Second
		return &OpError{Kind: OpUnavailable, Code: terr.ErrorCode(), RetryAfter: retry,
			Message: "Fortnox did not answer the refresh (" + terr.Error() + "). If the request reached Fortnox, its answer was stored; otherwise the refresh token was not used. Check GET /fortnox/tenants, and retry with the same token if it is not there."}
	}
	return &OpError{Kind: OpToken, Token: terr, Code: terr.ErrorCode(), Message: terr.Error() + ": " + terr.Advice(subj.Tenant)}
}

// HandOver spends a refresh token once to learn whose it is, and stores
// the new one under subj when the new access token names subj's tenant
// (and, for a named account bound to a user, that user). A token that is
// another tenant's (or user's) is never stored under subj, nor under its
// own tenant: its new refresh token goes to the quarantine (409). Once the
// token is sent, nothing cancels the exchange: not the client leaving, not
// a reload. The answer is stored first. how says where it came from, for
// the log.
func (o Ops) HandOver(ctx context.Context, subj Subject, refreshToken, how string) error {
	m := o.m
	rs, err := o.Records()
	if err != nil {
		return err
	}
	s := m.Settings.Load()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), LockBudget+RefreshCallLimit+time.Minute)
	defer cancel()
	var kept keptAnswer
	err = rs.withLock(ctx, subj, func() error {
		// A record that cannot be read or belongs elsewhere is not
		// touched, so the token is not spent either.
		rec, err := rs.loadOrNew(ctx, subj)
		if err != nil {
			return err
		}
		answer, took, stored, err := m.refresh.spendRefreshToken(s, refreshToken)
		defer stored()
		if err != nil {
			terr := AsTokenError(err)
			metricsTokenRequest(GrantRefreshToken, terr.ErrorCode(), took)
			kept.failure = adminTokenError(subj, terr, m.clock.Now())
			return nil
		}
		metricsTokenRequest(GrantRefreshToken, "ok", took)
		kept = o.keepAnswerFor(ctx, s, subj, rec, answer)
		return nil
	})
	if err != nil {
		return adminStoreError("storing the refresh token", err)
	}
	return o.finishHandOver(subj, kept, how)
}

// StoreAnswer stores a code exchange's answer under subj, as handOver
// stores a refresh answer: only when it is subj's. The code is spent, so
// the answer is never lost: a record that cannot be written to goes to
// quarantine.
func (o Ops) StoreAnswer(ctx context.Context, subj Subject, answer *Answer) error {
	m := o.m
	rs, err := o.Records()
	if err != nil {
		return err
	}
	s := m.Settings.Load()
	var kept keptAnswer
	err = rs.withLock(ctx, subj, func() error {
		rec, err := rs.loadOrNew(ctx, subj)
		if err != nil {
			return err
		}
		kept = o.keepAnswerFor(ctx, s, subj, rec, answer)
		return nil
	})
	if err != nil {
		terr := &Error{Failure: FailStorage, Tenant: subj.Tenant, Cause: err}
		where := "lost"
		if st := m.quarantine.quarantineAnswer(ctx, s, subj, answer, terr); st != nil {
			where = quarantinedWhere(st)
		}
		return opErrorf(OpStorage, "token_storage_unavailable", "the record of %s could not be used (%v); the new refresh token was %s", subj, err, where)
	}
	return o.finishHandOver(subj, kept, "from a connection")
}

// keptAnswer is what became of a handed-over answer.
type keptAnswer struct {
	stranded *strandedToken // another tenant's (or user's): in quarantine
	mismatch *Error
	failure  error
}

// keepAnswerFor stores an answer under subj if it is subj's, under subj's
// lock (held by the caller), or quarantines it.
func (o Ops) keepAnswerFor(ctx context.Context, s *Settings, subj Subject, rec *Record, answer *Answer) keptAnswer {
	m := o.m
	if terr := checkTokenBinding(answer.AccessToken, subj, GrantRefreshToken, rec.UserID); terr != nil {
		return keptAnswer{stranded: m.quarantine.quarantineAnswer(ctx, s, subj, answer, terr), mismatch: terr}
	}
	var kept keptAnswer
	issued := m.clock.Now()
	spent := tokenHash(rec.RefreshToken)
	m.refresh.keepAnswer(rec, answer, issued, subj)
	if subj.Account == "" {
		rec.ConsentRevokedAt = time.Time{}
	}
	journaled := m.refresh.journalRotated(s, subj, spent, rec)
	if err := m.refresh.storeRotated(ctx, s, subj, rec, journaled); err != nil {
		kept.failure = opErrorf(OpStorage, "token_storage_unavailable", "storing the new refresh token for %s failed (%v); it is kept (in the journal, or in memory) and saved when the store answers again", subj, err)
	}
	if subj.Account != "" {
		m.CacheToken(subj, GrantRefreshToken, answer.AccessToken, issued, answer.Lifetime, s.RefreshBefore)
	}
	return kept
}

// finishHandOver answers a hand-over after the lock is released. A
// mismatched token stays in the quarantine: it is not served under subj,
// nor under its own tenant until an operator releases it.
func (o Ops) finishHandOver(subj Subject, kept keptAnswer, how string) error {
	m := o.m
	if kept.mismatch != nil {
		kept.mismatch.handedOver = true
		if kept.stranded != nil {
			kept.mismatch.detail = "The new refresh token Fortnox returned was " + quarantinedWhere(kept.stranded) + "; nothing was stored for " + subj.String() + "."
		}
		m.Logger().Error("a refresh token handed over "+how+" is not the tenant's (or user's): not stored under it",
			append(subj.LogFields(), zap.String("token_tenant", kept.mismatch.TokenTenant), zap.String("error", kept.mismatch.Error()))...)
		return adminTokenError(subj, kept.mismatch, m.clock.Now())
	}
	if kept.failure != nil {
		return kept.failure
	}
	o.tenantRecovered(subj)
	m.Logger().Info("refresh token stored "+how, subj.LogFields()...)
	return nil
}

// tenantRecovered forgets a subject's failure after a new refresh token,
// here and in every sidecar.
func (o Ops) tenantRecovered(subj Subject) {
	m := o.m
	m.ledger.recovered(subj)
	m.notes.notifyChainRestored(subj)
	m.tell(Event{Kind: eventRecovered, Tenant: subj.Tenant, Account: subj.Account})
}

// ImportRefreshToken uses a refresh token of an unknown tenant once, reads
// the tenant from the new access token and stores the new refresh token
// under it. The old token is dead once Fortnox answers, so the new one is
// stored before anything else: in quarantine when no tenant can be read.
func (o Ops) ImportRefreshToken(ctx context.Context, refreshToken string) (string, error) {
	m := o.m
	rs, err := o.Records()
	if err != nil {
		return "", err
	}
	s := m.Settings.Load()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), LockBudget+RefreshCallLimit+time.Minute)
	defer cancel()
	answer, took, stored, err := m.refresh.spendRefreshToken(s, refreshToken)
	defer stored()
	if err != nil {
		terr := AsTokenError(err)
		metricsTokenRequest(GrantRefreshToken, terr.ErrorCode(), took)
		return "", adminTokenError(Subject{}, terr, m.clock.Now())
	}
	metricsTokenRequest(GrantRefreshToken, "ok", took)
	tenant, terr := TenantFromToken(answer.AccessToken)
	if terr != nil {
		mismatch := &Error{Failure: FailTenantMismatch, Cause: fmt.Errorf("Fortnox's token names no tenant (%v)", terr)}
		where := "lost"
		if st := m.quarantine.quarantineAnswer(ctx, s, Subject{}, answer, mismatch); st != nil {
			where = quarantinedWhere(st)
		}
		return "", opErrorf(OpBadGateway, "bad_token_response", "the new access token carries no tenantId (%v), so the tenant is unknown; the new refresh token was %s", terr, where)
	}
	subj := Subject{Tenant: tenant}
	issued := m.clock.Now()
	err = rs.withLock(ctx, subj, func() error {
		rec, err := rs.loadOrNew(ctx, subj)
		if err != nil {
			return err
		}
		m.refresh.keepAnswer(rec, answer, issued, subj)
		rec.ConsentRevokedAt = time.Time{}
		return rs.saveHard(ctx, subj, rec)
	})
	if err != nil {
		rec := &Record{Mode: GrantRefreshToken}
		m.refresh.keepAnswer(rec, answer, issued, subj)
		m.ledger.keepUnsaved(subj.Key(), rec)
		m.Logger().Error("THE NEW REFRESH TOKEN COULD NOT BE SAVED: kept in memory until storage works", zap.String("tenant", tenant), zap.Error(err))
		return "", opErrorf(OpStorage, "token_storage_unavailable", "storing the refresh token for tenant %s failed (%v); it is kept in memory and saved on the tenant's next token request", tenant, err)
	}
	m.drop(subj, nil)
	m.CacheToken(subj, GrantRefreshToken, answer.AccessToken, issued, answer.Lifetime, s.RefreshBefore)
	o.tenantRecovered(subj)
	m.Logger().Info("refresh token imported through the admin API", zap.String("tenant", tenant))
	return tenant, nil
}

// DropToken drops the tenant's access token, cached and stored, so that
// the next request gets a new one.
func (o Ops) DropToken(ctx context.Context, tenant string) error {
	m := o.m
	rs, err := o.Records()
	if err != nil {
		return err
	}
	subj := Subject{Tenant: tenant}
	_, cached := m.Cache.Get(tenant)
	known := m.ledger.Knows(tenant)
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
		return opErrorf(OpNotFound, "unknown_tenant", "tenant %s is not known", tenant)
	}
	m.drop(subj, nil)
	if v, ok := m.Cache.Get(tenant); ok {
		_ = m.Shared().DropToken(ctx, subj, v.(*Token).accessToken())
	}
	if c := m.Cluster.Load(); c != nil {
		_ = c.DropAnyToken(ctx, subj)
	}
	m.tell(Event{Kind: eventDropped, Tenant: tenant})
	return nil
}

// DeleteAccount forgets a named account: its record, its cached token and
// its state. With revoke, its refresh token is first revoked at Fortnox; if
// that fails, nothing is deleted.
func (o Ops) DeleteAccount(ctx context.Context, subj Subject, revoke bool) error {
	m := o.m
	rs, err := o.Records()
	if err != nil {
		return err
	}
	s := m.Settings.Load()
	found := false
	var revokeErr error
	err = rs.withLock(ctx, subj, func() error {
		rec, err := rs.load(ctx, subj)
		if err != nil || rec == nil {
			return err
		}
		found = true
		if revoke && rec.liveRefreshToken() {
			rctx, cancel := context.WithTimeout(ctx, s.TokenTimeout)
			revokeErr = m.Client.revoke(rctx, s.Cred, rec.RefreshToken)
			cancel()
			if revokeErr != nil {
				return nil
			}
		}
		return rs.Storage.Delete(ctx, RecordKey(m.clientID, subj))
	})
	if err != nil {
		return adminStoreError("deleting the account", err)
	}
	if revokeErr != nil {
		terr := AsTokenError(revokeErr)
		return &OpError{Kind: OpToken, Token: terr, Code: "revoke_failed", RetryAfter: time.Second,
			Message: "Fortnox did not revoke the account's refresh token (" + terr.Error() + "); nothing was deleted: try again, or delete without ?revoke=true"}
	}
	known := m.ledger.Knows(subj.Key())
	m.forget(subj)
	if c := m.Cluster.Load(); c != nil {
		_ = c.DropAnyToken(ctx, subj)
	}
	m.tell(Event{Kind: eventForget, Tenant: subj.Tenant, Account: subj.Account})
	if !found && !known {
		return opErrorf(OpNotFound, "unknown_account", "%s is not known", subj)
	}
	m.Logger().Info("account deleted through the admin API", append(subj.LogFields(), zap.Bool("revoked", revoke))...)
	return nil
}

// DeleteQuarantine removes a quarantine record.
func (o Ops) DeleteQuarantine(ctx context.Context, id string) error {
	m := o.m
	rs, err := o.Records()
	if err != nil {
		return err
	}
	if !validQuarantineID(id) {
		return opErrorf(OpInvalid, "invalid_id", "%q is not a quarantine id (see GET /fortnox/quarantine)", id)
	}
	if _, err := o.loadQuarantine(ctx, rs, id); err != nil {
		return opErrorf(OpNotFound, "unknown_id", "no quarantine record %s", id)
	}
	if err := rs.Storage.Delete(ctx, QuarantineKey(m.clientID, id)); err != nil {
		return adminStoreError("deleting the quarantine record", storageError("deleting", QuarantineKey(m.clientID, id), err))
	}
	m.Logger().Info("quarantine record deleted through the admin API", zap.String("quarantine_id", id))
	return nil
}

// TenantInfo is one row of GET /fortnox/tenants. Never a token.
type TenantInfo struct {
	Tenant          string     `json:"tenant"`
	Mode            string     `json:"mode"`
	TokenExpiresAt  *time.Time `json:"token_expires_at"`
	HasRefreshToken bool       `json:"has_refresh_token"`
	LastError       *string    `json:"last_error"`
	// RefreshTokenAge: seconds since the stored refresh token was issued
	// (Fortnox's die after 45 days unused); null when unknown or none.
	RefreshTokenAge *int64        `json:"refresh_token_age_seconds"`
	ConsentRevoked  bool          `json:"consent_revoked"`
	Accounts        []AccountInfo `json:"accounts"`
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

// AccountInfo is a named user account in a tenantInfo row. Never a token.
type AccountInfo struct {
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

// TenantsInfo lists every tenant (and named account) known in memory or
// in storage.
func (o Ops) TenantsInfo(ctx context.Context) ([]TenantInfo, error) {
	m := o.m
	rs, err := o.Records()
	if err != nil {
		return nil, err
	}
	n := m.clock.Now()
	rows := map[Subject]*subjectInfo{}
	row := func(subj Subject) *subjectInfo {
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
			msg := asStorageError(err).ErrorCode() + ": " + err.Error()
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
			r.mode = string(rec.Mode)
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
			msg := noRefreshToken(subj, rec).ErrorCode() + ": " + noRefreshToken(subj, rec).Advice(subj.Tenant)
			r.lastError = &msg
		}
	}
	m.ledger.each(func(key string, st *TenantState) {
		tenant, account, _ := strings.Cut(key, "/")
		r := row(Subject{Tenant: tenant, Account: account})
		if st.Mode != "" {
			r.mode = string(st.Mode)
		}
		if st.hasRefreshToken {
			r.hasRefreshToken = st.LastError == nil || st.LastError.Failure != FailGrantRejected
		}
		if st.ConsentRevoked {
			r.revoked = true
		}
		if st.LastError != nil {
			msg := st.LastError.ErrorCode() + ": " + st.LastError.Error()
			r.lastError = &msg
		}
	})
	for key, item := range m.Cache.Items() {
		t := item.Object.(*Token)
		if t.UsableAt(n.UnixNano()) {
			tenant, account, _ := strings.Cut(key, "/")
			r := row(Subject{Tenant: tenant, Account: account})
			exp := t.expiry().UTC()
			r.expiresAt = &exp
			if r.mode == "none" {
				r.mode = string(t.grant)
			}
		}
	}
	byTenant := map[string]*TenantInfo{}
	tenantRow := func(tenant string) *TenantInfo {
		t := byTenant[tenant]
		if t == nil {
			t = &TenantInfo{Tenant: tenant, Mode: "none", Accounts: []AccountInfo{}, Quarantined: []quarantinedInfo{}}
			byTenant[tenant] = t
		}
		return t
	}
	quarantined, err := o.ListQuarantine(ctx, rs)
	if err != nil {
		return nil, err
	}
	for _, q := range quarantined {
		// A token that names no tenant belongs to none: GET
		// /fortnox/quarantine lists it.
		if q.Tenant == nil || !ValidTenantID(*q.Tenant) {
			continue
		}
		t := tenantRow(*q.Tenant)
		t.Quarantined = append(t.Quarantined, quarantinedInfo{ID: q.ID, Account: ptrText(q.Account),
			HandedOverFor: q.SubmittedFor, At: q.CreatedAt.UTC().Truncate(time.Second)})
	}
	for subj, r := range rows {
		t := tenantRow(subj.Tenant)
		if subj.Account == "" {
			t.Mode, t.TokenExpiresAt, t.HasRefreshToken, t.LastError = r.mode, r.expiresAt, r.hasRefreshToken, r.lastError
			t.RefreshTokenAge, t.ConsentRevoked = r.refreshAge, r.revoked
			continue
		}
		t.Accounts = append(t.Accounts, AccountInfo{Name: subj.Account, UserID: r.userID, TokenExpiresAt: r.expiresAt,
			HasRefreshToken: r.hasRefreshToken, LastError: r.lastError, RefreshTokenAge: r.refreshAge})
	}
	out := make([]TenantInfo, 0, len(byTenant))
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
