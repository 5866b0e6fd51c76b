package fortnox

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
)

// Defaults for the refresh-token fallback.
const (
	defaultRetryClientCredentials = time.Hour
	// lockBudget bounds how long a refresh may wait for another process's
	// storage lock (a dead holder's file lock goes stale after about 10s).
	lockBudget = 30 * time.Second
	// refreshCallLimit bounds a refresh-token request once it is sent. It
	// is not token_timeout, and no caller, reload or shutdown cuts it short:
	// Fortnox may already have rotated the refresh token, and its answer
	// holds the only live one.
	refreshCallLimit = 30 * time.Second
)

// errNoRefreshToken: the subject has no stored refresh token to use.
var errNoRefreshToken = errors.New("no refresh token stored")

// refreshTokenFirst says whether tenant is on the refresh-token fallback
// and not yet due to try client credentials again.
func (m *tokenManager) refreshTokenFirst(tenant string, n time.Time) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.tenants[tenant]
	return st != nil && st.mode == grantRefreshToken && n.Before(st.ccRetryAt)
}

// noteClientCredentialsRefused schedules the next client-credentials try
// for a tenant that fell back to its refresh token.
func (m *tokenManager) noteClientCredentialsRefused(tenant string, s *managerSettings) {
	m.mu.Lock()
	m.state(tenant).ccRetryAt = clk.Now().Add(s.retryClientCredentials)
	m.mu.Unlock()
}

// forgetMode makes a tenant whose refresh-token record disappeared start
// over with client credentials.
func (m *tokenManager) forgetMode(tenant string) {
	m.mu.Lock()
	if st := m.tenants[tenant]; st != nil {
		st.mode, st.ccRetryAt, st.hasRefreshToken = "", time.Time{}, false
	}
	m.mu.Unlock()
}

// beginRefresh registers a refresh-token request about to be sent, unless
// the manager is being destroyed (then none may start). Destruct waits for
// those registered.
func (m *tokenManager) beginRefresh() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ctx.Err() != nil {
		return false
	}
	m.refreshes.Add(1)
	return true
}

var errStopping = errors.New("the sidecar is reloading or stopping")

// spendRefreshToken sends one refresh-token request. Once sent, nothing
// cancels it (see refreshCallLimit). The caller stores its answer before
// anything else, then calls stored: until then a manager being destroyed
// waits (see Destruct).
func (m *tokenManager) spendRefreshToken(s *managerSettings, refreshToken string) (answer *tokenAnswer, took time.Duration, stored func(), err error) {
	release, err := m.tokenSlot(s)
	if err != nil {
		return nil, 0, func() {}, err
	}
	defer release()
	if !m.beginRefresh() {
		return nil, 0, func() {}, &tokenError{failure: failUnavailable, cause: errStopping, retryAt: clk.Now().Add(time.Second)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), refreshCallLimit)
	defer cancel()
	start := time.Now()
	answer, err = m.client.refresh(ctx, s.cred, refreshToken)
	return answer, max(time.Since(start), time.Nanosecond), sync.OnceFunc(m.refreshes.Done), err
}

// viaRefreshToken gets a token with the subject's stored refresh token,
// safely across processes: under the subject's storage lock it re-reads
// the record (another replica may have refreshed already: then its access
// token is used), refreshes, and stores the new refresh token before
// anything else. A refresh token Fortnox rejected is marked so that no
// process tries it again; only a new one (admin API) recovers the subject.
// The new access token must name the subject's tenant: one that names
// another is never used (see strand).
func (m *tokenManager) viaRefreshToken(s *managerSettings, subj subject, stale *cachedToken) (*cachedToken, error) {
	if s.records == nil {
		return nil, errNoRefreshToken
	}
	ctx, cancel := context.WithTimeout(m.ctx, lockBudget+s.tokenTimeout)
	defer cancel()
	if err := m.saveUnsaved(ctx, s, subj); err != nil {
		return nil, m.storageFailure(subj, err)
	}

	// A look without the lock: most tenants have no record at all, and a
	// fresh access token stored by another replica needs no lock either.
	span := m.storeSpan(subj, opLoadRecord)
	rec, err := s.records.load(ctx, subj)
	span.endErr(err)
	if err != nil {
		return nil, m.storageFailure(subj, err)
	}
	if terr := noRefreshToken(subj, rec); terr != nil {
		return nil, m.failedWithoutRequest(subj, terr)
	}
	if rec == nil || rec.RefreshToken == "" {
		return nil, errNoRefreshToken
	}
	if t, terr := m.useStored(s, subj, rec, stale); t != nil || terr != nil {
		if terr != nil {
			return nil, m.failedWithoutRequest(subj, terr)
		}
		return t, nil
	}

	var token *cachedToken
	var failure *tokenError
	var r rotated
	lock := m.childSpan(subj, spanLock)
	err = s.records.withLock(ctx, subj, func() error {
		lock.end(outcomeOK)
		span := m.storeSpan(subj, opLoadRecord)
		rec, err := s.records.load(ctx, subj)
		span.endErr(err)
		if err != nil {
			return err
		}
		if failure = noRefreshToken(subj, rec); failure != nil {
			return nil
		}
		if rec == nil || rec.RefreshToken == "" {
			return errNoRefreshToken
		}
		if token, failure = m.useStored(s, subj, rec, stale); token != nil || failure != nil {
			return nil
		}
		if !rec.RejectedAt.IsZero() {
			failure = &tokenError{failure: failGrantRejected, code: "invalid_grant", description: "rejected earlier; waiting for a new refresh token"}
			return nil
		}
		if r = m.refreshStored(ctx, s, subj, rec); r.failure != nil {
			failure = r.failure
			return nil
		}
		token = m.cacheToken(subj, grantRefreshToken, r.answer.accessToken, r.issued, r.answer.lifetime, s.refreshBefore)
		return nil
	})
	lock.endErr(err) // the lock was not had (when it was, its span ended)
	m.settle(r)
	took := r.took
	switch {
	case errors.Is(err, errNoRefreshToken):
		return nil, errNoRefreshToken
	case err != nil:
		return nil, m.storageFailure(subj, err)
	case failure != nil:
		m.recordFailure(subj, grantRefreshToken, failure, took)
		return nil, failure
	}
	if took > 0 {
		m.recordSuccess(subj, grantRefreshToken, token, took)
		m.share(subj, token)
	} else {
		m.noteMode(subj, grantRefreshToken)
	}
	return token, nil
}

// rotated is what one refresh of a stored refresh token gave.
type rotated struct {
	answer   *tokenAnswer // nil when it failed
	issued   time.Time
	took     time.Duration // 0: no request was sent
	stranded *strandedToken
	failure  *tokenError
}

// refreshStored spends rec's refresh token (the caller holds subj's lock)
// and stores the new one before anything else. A refresh token Fortnox
// rejected is marked (refreshRefused); an answer that is another tenant's
// (or user's) is stranded, and the caller calls settle without the lock.
func (m *tokenManager) refreshStored(ctx context.Context, s *managerSettings, subj subject, rec *tokenRecord) rotated {
	span := m.childSpan(subj, spanTokenRequest, trace.WithAttributes(attrGrant.String(grantRefreshToken)))
	answer, took, stored, err := m.spendRefreshToken(s, rec.RefreshToken)
	span.endAnswer(answer, err)
	defer stored()
	r := rotated{took: took}
	if err != nil {
		r.failure = m.refreshRefused(ctx, s, subj, rec, err)
		return r
	}
	// The old refresh token is dead now: the new one goes to storage
	// before the access token is used.
	if terr := checkTokenBinding(answer.accessToken, subj, grantRefreshToken, rec.UserID); terr != nil {
		r.stranded, r.failure = m.strand(ctx, s, subj, rec, answer, terr)
		return r
	}
	r.answer, r.issued = answer, clk.Now()
	m.keepAnswer(rec, answer, r.issued, subj)
	_ = m.storeRotated(ctx, s, subj, rec)
	return r
}

// settle says where a stranded refresh token went: the quarantine, never
// another tenant's record.
func (m *tokenManager) settle(r rotated) {
	if r.stranded != nil {
		r.failure.detail = "The new refresh token Fortnox returned was " + quarantinedWhere(r.stranded) + "."
	}
}

// storeRotated writes a record that holds a new refresh token (the old one
// is dead). If storage still fails, the record is kept in memory and
// written before any further refresh of the subject, and the loudest line
// says so.
func (m *tokenManager) storeRotated(ctx context.Context, s *managerSettings, subj subject, rec *tokenRecord) error {
	span := m.storeSpan(subj, opSaveRecord)
	err := s.records.saveHard(ctx, subj, rec)
	span.endErr(err)
	if err != nil {
		m.keepUnsaved(subj, rec)
		m.logger().Error("THE NEW REFRESH TOKEN COULD NOT BE SAVED: it is kept in memory and written on the next token request for the tenant; do not restart this process before storage works again",
			append(subj.logFields(), zap.Error(err))...)
	}
	return err
}

// noRefreshToken explains a record that holds no usable refresh token
// because of something the operator must see: it was marked as another
// tenant's. nil otherwise.
func noRefreshToken(subj subject, rec *tokenRecord) *tokenError {
	if rec == nil || rec.RefreshToken != "" || rec.MismatchTenant == "" {
		return nil
	}
	return &tokenError{failure: failTenantMismatch, tenant: subj.tenant, tokenTenant: rec.MismatchTenant,
		detail: "The refresh token it held was spent at " + rec.MismatchAt.Format(time.RFC3339) + "; the new one was kept in the quarantine then (see the log and GET /fortnox/tenants)."}
}

// keepAnswer puts a refresh answer into the record.
func (m *tokenManager) keepAnswer(rec *tokenRecord, answer *tokenAnswer, issued time.Time, subj subject) {
	if answer.refreshToken != "" {
		rec.RefreshToken = answer.refreshToken
		rec.RefreshTokenAt = issued.UTC()
	} else {
		m.logger().Warn("Fortnox's refresh answer had no new refresh token; keeping the old one", subj.logFields()...)
	}
	if user := tokenUserID(answer.accessToken); user != "" && subj.account != "" {
		rec.UserID = user
	}
	rec.Mode = grantRefreshToken
	rec.AccessToken = answer.accessToken
	rec.IssuedAt = issued.UTC()
	rec.ExpiresAt = issued.Add(answer.lifetime).UTC()
	rec.RejectedAt = time.Time{}
	rec.MismatchTenant, rec.MismatchAt = "", time.Time{}
}

// refreshRefused turns a failed refresh into the subject's failure, and
// marks a refresh token Fortnox rejected so that no process tries it again.
func (m *tokenManager) refreshRefused(ctx context.Context, s *managerSettings, subj subject, rec *tokenRecord, err error) *tokenError {
	failure := asTokenError(err)
	switch {
	case failure.failure == failNoConsent && failure.code != "invalid_grant":
		// Another 4xx (a proxy's 403, a 413): the token may still be
		// good, so it is not marked dead; the tenant backs off.
		failure.failure = failBadAnswer
	case failure.failure == failNoConsent: // invalid_grant: the refresh token is dead
		failure.failure = failGrantRejected
		rec.RejectedAt = clk.Now().UTC()
		span := m.storeSpan(subj, opSaveRecord)
		serr := s.records.save(ctx, subj, rec)
		span.endErr(serr)
		if serr != nil {
			m.logger().Error("could not mark the rejected refresh token in storage", append(subj.logFields(), zap.Error(serr))...)
		}
		m.notifyChainBroken(subj, "refresh_token_rejected")
	}
	return failure
}

// useStored caches and returns the record's access token when it is fresh
// (not the stale one, not one Fortnox refused, and not yet due for
// refresh). A stored token that names another tenant (or user) than its
// record is refused with an error: the record was tampered with.
func (m *tokenManager) useStored(s *managerSettings, subj subject, rec *tokenRecord, stale *cachedToken) (*cachedToken, *tokenError) {
	if rec.AccessToken == "" || rec.IssuedAt.IsZero() || !rec.ExpiresAt.After(rec.IssuedAt) {
		return nil, nil
	}
	bearer := "Bearer " + rec.AccessToken
	if (stale != nil && stale.bearer == bearer) || m.wasRejected(subj, bearer) {
		return nil, nil
	}
	lifetime := rec.ExpiresAt.Sub(rec.IssuedAt)
	n := clk.Now()
	if !n.Before(rec.IssuedAt.Add(refreshAheadAfter(lifetime, s.refreshBefore))) || !n.Before(rec.ExpiresAt.Add(-skewFor(lifetime))) {
		return nil, nil
	}
	if terr := checkTokenBinding(rec.AccessToken, subj, grantRefreshToken, rec.UserID); terr != nil {
		terr.detail = "It was read from the record stored for " + subj.String() + ", which is not overwritten."
		return nil, terr
	}
	t := m.cacheToken(subj, grantRefreshToken, rec.AccessToken, rec.IssuedAt, lifetime, s.refreshBefore)
	m.noteMode(subj, grantRefreshToken)
	return t, nil
}

// wasRejected says whether Fortnox answered 401 to this bearer token.
func (m *tokenManager) wasRejected(subj subject, bearer string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.tenants[subj.key()]
	return st != nil && st.rejected == bearer
}

// noteMode records the grant a subject's token came from without a token
// request of this process (it was found in storage).
func (m *tokenManager) noteMode(subj subject, grant string) {
	m.mu.Lock()
	st := m.state(subj.key())
	st.mode, st.hasRefreshToken = grant, true
	st.failures, st.lastError, st.retryAt, st.unknown = 0, nil, time.Time{}, false
	m.mu.Unlock()
}

func (m *tokenManager) keepUnsaved(subj subject, rec *tokenRecord) {
	m.mu.Lock()
	m.state(subj.key()).unsaved = rec
	m.mu.Unlock()
}

// saveUnsaved writes a record whose save failed earlier. Until it is
// written, no refresh may happen: its refresh token is the only live one.
func (m *tokenManager) saveUnsaved(ctx context.Context, s *managerSettings, subj subject) error {
	m.mu.Lock()
	st := m.tenants[subj.key()]
	var rec *tokenRecord
	if st != nil {
		rec = st.unsaved
	}
	m.mu.Unlock()
	if rec == nil {
		return nil
	}
	if err := s.records.withLock(ctx, subj, func() error { return s.records.saveHard(ctx, subj, rec) }); err != nil {
		return err
	}
	m.mu.Lock()
	if st.unsaved == rec {
		st.unsaved = nil
	}
	m.mu.Unlock()
	m.logger().Warn("the refresh token that could not be saved earlier is saved now", subj.logFields()...)
	return nil
}

// storageFailure records a storage error as the subject's failure.
func (m *tokenManager) storageFailure(subj subject, err error) *tokenError {
	return m.failedWithoutRequest(subj, asStorageError(err))
}

// failedWithoutRequest records a failure found before any token request.
func (m *tokenManager) failedWithoutRequest(subj subject, terr *tokenError) *tokenError {
	m.recordFailure(subj, grantRefreshToken, terr, 0)
	return terr
}

// asStorageError is the token error of a storage failure: a record that
// names another tenant is a tenant mismatch; the rest is the store's fault.
func asStorageError(err error) *tokenError {
	return classifyFailure(err, failStorage)
}
