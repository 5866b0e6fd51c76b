package fortnox

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// A revoked service-account consent blocks the tenant's service account
// (client credentials, and its own refresh token) until a new consent or a
// new refresh token arrives. The mark is written into the tenant's record,
// so that it survives a restart. Named user accounts rest on their own
// consents and are not blocked.

// consentCreated notes that a customer gave the integration a
// service-account consent: the tenant is known, and its next request tries
// client credentials at once (no backoff left from earlier refusals). The
// mark is cleared in the tenant's record and every sidecar is told.
//
// The record is written before the memory: in cluster mode another
// sidecar's broadcast may arrive meanwhile, and it is weighed against the
// record (see applyEvent), so the record must already hold this event.
func (m *tokenManager) consentCreated(tenant string) {
	if err := m.persistRevocation(tenant, false); err != nil {
		m.logger().Error("could not clear the stored consent revocation", zap.String("tenant", tenant), zap.Error(err))
	}
	m.noteCreated(tenant)
	m.notifyConsent(tenant, eventCreated)
	m.tell(event{Kind: eventCreated, Tenant: tenant})
	m.logger().Info("consent created", zap.String("tenant", tenant))
}

// noteCreated is consentCreated in this process's memory.
func (m *tokenManager) noteCreated(tenant string) {
	m.mu.Lock()
	st := m.state(tenant)
	st.consentRevoked, st.revocationRead = false, true
	st.lastError, st.failures, st.retryAt, st.ccRetryAt, st.unknown = nil, 0, time.Time{}, time.Time{}, false
	if st.mode == grantRefreshToken {
		st.mode = "" // try client credentials first again
	}
	m.mu.Unlock()
}

// consentRevoked notes that a customer revoked the consent: its cached
// token is dropped and its requests are refused until a new consent or
// refresh token arrives. The mark is written into the tenant's record
// (it survives a restart; first, as in consentCreated) and every sidecar
// is told.
func (m *tokenManager) consentRevoked(tenant string) {
	if err := m.persistRevocation(tenant, true); err != nil {
		m.logger().Error("could not store the consent revocation: a restart would forget it", zap.String("tenant", tenant), zap.Error(err))
	}
	m.noteRevoked(tenant)
	if c := m.cluster.Load(); c != nil {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), sharedCallLimit)
		_ = c.dropAnyToken(ctx, subject{tenant: tenant})
		cancel()
	}
	m.notifyConsent(tenant, eventRevoked)
	m.tell(event{Kind: eventRevoked, Tenant: tenant})
	m.logger().Warn("consent revoked: requests for the tenant are refused until it authorizes again", zap.String("tenant", tenant))
}

// noteRevoked is consentRevoked in this process's memory.
func (m *tokenManager) noteRevoked(tenant string) {
	m.mu.Lock()
	st := m.state(tenant)
	st.consentRevoked, st.revocationRead = true, true
	st.lastError = &tokenError{failure: failConsentRevoked}
	m.mu.Unlock()
	// A token request in flight may cache its token after this: wait for it
	// (joining its flight, or taking the slot so none starts), then drop.
	_, _, _ = m.flights.Do(tenant, func() (any, error) {
		return nil, &tokenError{failure: failConsentRevoked}
	})
	m.drop(subject{tenant: tenant}, nil)
}

// tell publishes an event to the other sidecars (in cluster mode).
func (m *tokenManager) tell(ev event) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), sharedCallLimit)
	defer cancel()
	if err := m.shared().publish(ctx, ev); err != nil {
		m.logger().Warn("could not tell the other sidecars", zap.String("event", ev.Kind), zap.String("tenant", ev.Tenant), zap.Error(err))
	}
}

// persistRevocation writes (or clears) the revocation mark in the tenant's
// record, under its lock. A revoked tenant's stored access token is
// dropped too.
func (m *tokenManager) persistRevocation(tenant string, revoked bool) error {
	s := m.settings.Load()
	if s == nil || s.records == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), lockBudget)
	defer cancel()
	subj := subject{tenant: tenant}
	return s.records.withLock(ctx, subj, func() error {
		rec, err := s.records.load(ctx, subj)
		if err != nil {
			return err
		}
		switch {
		case rec == nil && !revoked:
			return nil
		case rec == nil:
			rec = &tokenRecord{}
		case !revoked && rec.ConsentRevokedAt.IsZero():
			return nil
		}
		if revoked {
			if rec.ConsentRevokedAt.IsZero() {
				rec.ConsentRevokedAt = clk.Now().UTC()
			}
			rec.AccessToken, rec.IssuedAt, rec.ExpiresAt = "", time.Time{}, time.Time{}
		} else {
			rec.ConsentRevokedAt = time.Time{}
		}
		return s.records.save(ctx, subj, rec)
	})
}

// revokedError is the answer for a tenant whose consent was revoked. The
// stored mark is read once per tenant state, so a restart remembers it.
func (m *tokenManager) revokedError(s *managerSettings, tenant string) error {
	m.mu.Lock()
	st := m.tenants[tenant]
	read := st != nil && st.revocationRead
	revoked := st != nil && st.consentRevoked
	m.mu.Unlock()
	if !read && s != nil && s.records != nil {
		ctx, cancel := context.WithTimeout(m.ctx, s.tokenTimeout)
		span := m.storeSpan(subject{tenant: tenant}, opLoadRecord)
		rec, err := s.records.load(ctx, subject{tenant: tenant})
		span.endErr(err)
		cancel()
		if err == nil {
			m.mu.Lock()
			st = m.state(tenant)
			if !st.revocationRead {
				st.revocationRead = true
				switch {
				case rec != nil && !rec.ConsentRevokedAt.IsZero():
					st.consentRevoked = true
					st.lastError = &tokenError{failure: failConsentRevoked}
				case st.consentRevoked:
					// Revoked here, but a new consent cleared the mark
					// (a broadcast this sidecar missed: resync).
					st.consentRevoked = false
					st.lastError, st.failures, st.retryAt = nil, 0, time.Time{}
				}
			}
			revoked = st.consentRevoked
			m.mu.Unlock()
		}
	}
	if revoked {
		return &tokenError{failure: failConsentRevoked}
	}
	return nil
}
