package tokens

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

// ConsentCreated notes that a customer gave the integration a
// service-account consent: the tenant is known, and its next request tries
// client credentials at once (no backoff left from earlier refusals). The
// mark is cleared in the tenant's record and every sidecar is told.
//
// The record is written before the memory: in cluster mode another
// sidecar's broadcast may arrive meanwhile, and it is weighed against the
// record (see applyEvent), so the record must already hold this event.
func (m *Manager) ConsentCreated(tenant string) {
	if err := m.consent.persistRevocation(tenant, false); err != nil {
		m.Logger().Error("could not clear the stored consent revocation", zap.String("tenant", tenant), zap.Error(err))
	}
	m.consent.noteCreated(tenant)
	m.notes.notifyConsent(tenant, eventCreated)
	m.tell(Event{Kind: eventCreated, Tenant: tenant})
	m.Logger().Info("consent created", zap.String("tenant", tenant))
}

// consents keeps a tenant's service-account consent: revoked and given
// again (webhooks, other sidecars), and the mark stored in its record.
type consents struct{ m *Manager }

// noteCreated is consentCreated in this process's memory.
func (cs consents) noteCreated(tenant string) {
	m := cs.m
	m.ledger.consentCreated(tenant)
}

// ConsentRevoked notes that a customer revoked the consent: its cached
// token is dropped and its requests are refused until a new consent or
// refresh token arrives. The mark is written into the tenant's record
// (it survives a restart; first, as in consentCreated) and every sidecar
// is told.
func (m *Manager) ConsentRevoked(tenant string) {
	if err := m.consent.persistRevocation(tenant, true); err != nil {
		m.Logger().Error("could not store the consent revocation: a restart would forget it", zap.String("tenant", tenant), zap.Error(err))
	}
	m.consent.noteRevoked(tenant)
	if c := m.Cluster.Load(); c != nil {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), SharedCallLimit)
		_ = c.DropAnyToken(ctx, Subject{Tenant: tenant})
		cancel()
	}
	m.notes.notifyConsent(tenant, eventRevoked)
	m.tell(Event{Kind: eventRevoked, Tenant: tenant})
	m.Logger().Warn("consent revoked: requests for the tenant are refused until it authorizes again", zap.String("tenant", tenant))
}

// noteRevoked is consentRevoked in this process's memory.
func (cs consents) noteRevoked(tenant string) {
	m := cs.m
	m.ledger.consentRevoked(tenant)
	// A token request in flight may cache its token after this: wait for it
	// (joining its flight, or taking the slot so none starts), then drop.
	_, _, _ = m.Flights.Do(tenant, func() (any, error) {
		return nil, &Error{Failure: FailConsentRevoked}
	})
	m.drop(Subject{Tenant: tenant}, nil)
}

// tell publishes an event to the other sidecars (in cluster mode).
func (m *Manager) tell(ev Event) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), SharedCallLimit)
	defer cancel()
	if err := m.Shared().Publish(ctx, ev); err != nil {
		m.Logger().Warn("could not tell the other sidecars", zap.String("event", ev.Kind), zap.String("tenant", ev.Tenant), zap.Error(err))
	}
}

// persistRevocation writes (or clears) the revocation mark in the tenant's
// record, under its lock. A revoked tenant's stored access token is
// dropped too.
func (cs consents) persistRevocation(tenant string, revoked bool) error {
	m := cs.m
	s := m.Settings.Load()
	if s == nil || s.Records == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), LockBudget)
	defer cancel()
	subj := Subject{Tenant: tenant}
	return s.Records.withLock(ctx, subj, func() error {
		rec, err := s.Records.load(ctx, subj)
		if err != nil {
			return err
		}
		switch {
		case rec == nil && !revoked:
			return nil
		case rec == nil:
			rec = &Record{}
		case !revoked && rec.ConsentRevokedAt.IsZero():
			return nil
		}
		if revoked {
			if rec.ConsentRevokedAt.IsZero() {
				rec.ConsentRevokedAt = m.clock.Now().UTC()
			}
			rec.AccessToken, rec.IssuedAt, rec.ExpiresAt = "", time.Time{}, time.Time{}
		} else {
			rec.ConsentRevokedAt = time.Time{}
		}
		return s.Records.save(ctx, subj, rec)
	})
}

// revokedError is the answer for a tenant whose consent was revoked. The
// stored mark is read once per tenant state, so a restart remembers it.
func (cs consents) revokedError(s *Settings, tenant string) error {
	m := cs.m
	read, revoked := m.ledger.revocation(tenant)
	if !read && s != nil && s.Records != nil {
		ctx, cancel := context.WithTimeout(m.ctx, s.TokenTimeout)
		span := m.tracer.storeSpan(Subject{Tenant: tenant}, OpLoadRecord)
		rec, err := s.Records.load(ctx, Subject{Tenant: tenant})
		span.EndErr(err)
		cancel()
		if err == nil {
			revoked = m.ledger.revocationRead(tenant, rec != nil && !rec.ConsentRevokedAt.IsZero())
		}
	}
	if revoked {
		return &Error{Failure: FailConsentRevoked}
	}
	return nil
}
