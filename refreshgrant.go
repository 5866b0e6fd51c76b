package fortnox

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"
)

// Defaults for the refresh-token fallback.
const (
	defaultRetryClientCredentials = time.Hour
	// lockBudget bounds how long a refresh may wait for another process's
	// storage lock (a dead holder's file lock goes stale after about 10s).
	lockBudget = 30 * time.Second
)

// errNoRefreshToken: the tenant has no stored refresh token to fall back on.
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
	m.state(tenant).ccRetryAt = now().Add(s.retryClientCredentials)
	m.mu.Unlock()
}

// viaRefreshToken gets a token with the tenant's stored refresh token,
// safely across processes: under the tenant's storage lock it re-reads the
// record (another replica may have refreshed already: then its access token
// is used), refreshes, and stores the new refresh token before anything
// else. A refresh token Fortnox rejected is marked so that no process tries
// it again; only a new one (admin API) recovers the tenant.
func (m *tokenManager) viaRefreshToken(s *managerSettings, tenant string, stale *cachedToken) (*cachedToken, error) {
	if s.records == nil {
		return nil, errNoRefreshToken
	}
	ctx, cancel := context.WithTimeout(m.ctx, lockBudget+s.tokenTimeout)
	defer cancel()
	if err := m.saveUnsaved(ctx, s, tenant); err != nil {
		return nil, m.storageFailure(tenant, err)
	}

	// A look without the lock: most tenants have no record at all, and a
	// fresh access token stored by another replica needs no lock either.
	rec, err := s.records.load(ctx, tenant)
	if err != nil {
		return nil, m.storageFailure(tenant, err)
	}
	if rec == nil || rec.RefreshToken == "" {
		return nil, errNoRefreshToken
	}
	if t := m.useStored(s, tenant, rec, stale); t != nil {
		return t, nil
	}

	var token *cachedToken
	var failure *tokenError
	var took time.Duration
	err = s.records.withLock(ctx, tenant, func() error {
		rec, err := s.records.load(ctx, tenant)
		if err != nil {
			return err
		}
		if rec == nil || rec.RefreshToken == "" {
			return errNoRefreshToken
		}
		if token = m.useStored(s, tenant, rec, stale); token != nil {
			return nil
		}
		if !rec.RejectedAt.IsZero() {
			failure = &tokenError{failure: failGrantRejected, code: "invalid_grant", description: "rejected earlier; waiting for a new refresh token"}
			return nil
		}
		rctx, rcancel := context.WithTimeout(ctx, s.tokenTimeout)
		defer rcancel()
		start := time.Now()
		answer, err := m.client.refresh(rctx, s.cred, rec.RefreshToken)
		took = time.Since(start)
		if err != nil {
			failure = asTokenError(err)
			switch {
			case failure.failure == failNoConsent && failure.code != "invalid_grant":
				// Another 4xx (a proxy's 403, a 413): the token may still be
				// good, so it is not marked dead; the tenant backs off.
				failure.failure = failBadAnswer
			case failure.failure == failNoConsent: // invalid_grant: the refresh token is dead
				failure.failure = failGrantRejected
				rec.RejectedAt = now().UTC()
				if serr := s.records.save(ctx, rec); serr != nil {
					m.logger().Error("could not mark the rejected refresh token in storage", zap.String("tenant", tenant), zap.Error(serr))
				}
			}
			return nil
		}
		// The old refresh token is dead now: the new one goes to storage
		// before the access token is used.
		issued := now()
		if answer.refreshToken != "" {
			rec.RefreshToken = answer.refreshToken
		} else {
			m.logger().Warn("Fortnox's refresh answer had no new refresh token; keeping the old one", zap.String("tenant", tenant))
		}
		rec.Mode = grantRefreshToken
		rec.AccessToken = answer.accessToken
		rec.IssuedAt = issued.UTC()
		rec.ExpiresAt = issued.Add(answer.lifetime).UTC()
		rec.RejectedAt = time.Time{}
		if err := s.records.saveHard(ctx, rec); err != nil {
			m.keepUnsaved(tenant, rec)
			m.logger().Error("THE NEW REFRESH TOKEN COULD NOT BE SAVED: it is kept in memory and written on the next token request for the tenant; do not restart this process before storage works again",
				zap.String("tenant", tenant), zap.Error(err))
		}
		token = m.cacheToken(tenant, grantRefreshToken, answer.accessToken, issued, answer.lifetime, s.refreshBefore)
		return nil
	})
	switch {
	case errors.Is(err, errNoRefreshToken):
		return nil, errNoRefreshToken
	case err != nil:
		return nil, m.storageFailure(tenant, err)
	case failure != nil:
		m.recordFailure(tenant, grantRefreshToken, failure, took)
		return nil, failure
	}
	if took > 0 {
		m.recordSuccess(tenant, grantRefreshToken, token, took)
	} else {
		m.noteMode(tenant, grantRefreshToken)
	}
	return token, nil
}

// useStored caches and returns the record's access token when it is fresh
// (not the stale one, and not yet due for refresh).
func (m *tokenManager) useStored(s *managerSettings, tenant string, rec *tokenRecord, stale *cachedToken) *cachedToken {
	if rec.AccessToken == "" || rec.IssuedAt.IsZero() || !rec.ExpiresAt.After(rec.IssuedAt) {
		return nil
	}
	if stale != nil && stale.bearer == "Bearer "+rec.AccessToken {
		return nil
	}
	lifetime := rec.ExpiresAt.Sub(rec.IssuedAt)
	n := now()
	if !n.Before(rec.IssuedAt.Add(refreshAheadAfter(lifetime, s.refreshBefore))) || !n.Before(rec.ExpiresAt.Add(-skewFor(lifetime))) {
		return nil
	}
	t := m.cacheToken(tenant, grantRefreshToken, rec.AccessToken, rec.IssuedAt, lifetime, s.refreshBefore)
	m.noteMode(tenant, grantRefreshToken)
	return t
}

// noteMode records the grant a tenant's token came from without a token
// request of this process (it was found in storage).
func (m *tokenManager) noteMode(tenant, grant string) {
	m.mu.Lock()
	st := m.state(tenant)
	st.mode, st.hasRefreshToken = grant, true
	st.failures, st.lastError, st.retryAt = 0, nil, time.Time{}
	m.mu.Unlock()
}

func (m *tokenManager) keepUnsaved(tenant string, rec *tokenRecord) {
	m.mu.Lock()
	m.state(tenant).unsaved = rec
	m.mu.Unlock()
}

// saveUnsaved writes a record whose save failed earlier. Until it is
// written, no refresh may happen: its refresh token is the only live one.
func (m *tokenManager) saveUnsaved(ctx context.Context, s *managerSettings, tenant string) error {
	m.mu.Lock()
	st := m.tenants[tenant]
	var rec *tokenRecord
	if st != nil {
		rec = st.unsaved
	}
	m.mu.Unlock()
	if rec == nil {
		return nil
	}
	if err := s.records.withLock(ctx, tenant, func() error { return s.records.saveHard(ctx, rec) }); err != nil {
		return err
	}
	m.mu.Lock()
	if st.unsaved == rec {
		st.unsaved = nil
	}
	m.mu.Unlock()
	m.logger().Warn("the refresh token that could not be saved earlier is saved now", zap.String("tenant", tenant))
	return nil
}

// storageFailure records a storage error as the tenant's failure.
func (m *tokenManager) storageFailure(tenant string, err error) *tokenError {
	terr := &tokenError{failure: failStorage, cause: err}
	m.recordFailure(tenant, grantRefreshToken, terr, 0)
	return terr
}
