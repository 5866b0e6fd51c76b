package tokens

import (
	"context"

	"go.uber.org/zap"
)

// ApplyEvent applies another sidecar's event to this one's memory.
func (m *Manager) ApplyEvent(ev Event) {
	subj := Subject{Tenant: ev.Tenant, Account: ev.Account}
	if ce := m.Logger().Check(zap.DebugLevel, "event from another sidecar"); ce != nil {
		ce.Write(append(subj.LogFields(), zap.String("kind", ev.Kind))...)
	}
	switch ev.Kind {
	case eventRevoked, eventCreated:
		// Broadcasts may be read out of order: a sidecar can take a new
		// consent through its webhook before it reads another's earlier
		// revocation. The tenant's record, written before each broadcast,
		// has the latest word: an event it contradicts is stale.
		if revoked, known := m.consent.storedRevocation(ev.Tenant); known && revoked != (ev.Kind == eventRevoked) {
			return
		}
		if ev.Kind == eventRevoked {
			m.consent.noteRevoked(ev.Tenant)
		} else {
			m.consent.noteCreated(ev.Tenant)
		}
		m.notes.notifyConsent(ev.Tenant, ev.Kind) // told once, whichever sidecar claims it first
	case eventRecovered:
		m.ledger.recovered(subj)
	case EventInvalidate:
		if v, ok := m.Cache.Get(subj.Key()); ok {
			if t := v.(*Token); TokenHash(t.accessToken()) == ev.TokenHash {
				m.invalidate.reject(subj, t.Bearer)
				m.drop(subj, t)
			}
		}
	case eventDropped:
		m.drop(subj, nil)
	case eventForget:
		m.forget(subj)
	}
}

// storedRevocation reads whether the tenant's record marks its consent as
// revoked; known is false when there is no record or it cannot be read.
func (cs consents) storedRevocation(tenant string) (revoked, known bool) {
	m := cs.m
	s := m.Settings.Load()
	if s == nil || s.Records == nil {
		return false, false
	}
	ctx, cancel := context.WithTimeout(m.ctx, SharedCallLimit)
	defer cancel()
	rec, err := s.Records.load(ctx, Subject{Tenant: tenant})
	if err != nil || rec == nil {
		return false, false
	}
	return !rec.ConsentRevokedAt.IsZero(), true
}

// forget drops everything remembered in memory about a subject.
func (m *Manager) forget(subj Subject) {
	m.ledger.forget(subj.Key())
	m.drop(subj, nil)
}

// Resync reads the shared state again after an outage, or once subscribed:
// revocations and new consents broadcast meanwhile are read from the
// tenants' records.
func (m *Manager) Resync() {
	s := m.Settings.Load()
	tenants := m.ledger.resync()
	for key := range m.Cache.Items() {
		if _, _, isAccount := cutAccount(key); !isAccount {
			tenants = append(tenants, key)
		}
	}
	for _, tenant := range tenants {
		if m.consent.revokedError(s, tenant) != nil {
			m.drop(Subject{Tenant: tenant}, nil)
		}
	}
}

// cutAccount splits a subject key.
func cutAccount(key string) (tenant, account string, isAccount bool) {
	for i := 0; i < len(key); i++ {
		if key[i] == '/' {
			return key[:i], key[i+1:], true
		}
	}
	return key, "", false
}
