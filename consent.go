package fortnox

import (
	"time"

	"go.uber.org/zap"
)

// consentCreated notes that a customer gave the integration a
// service-account consent: the tenant is known, and its next request tries
// client credentials at once (no backoff left from earlier refusals).
func (m *tokenManager) consentCreated(tenant string) {
	m.mu.Lock()
	st := m.state(tenant)
	st.consentRevoked = false
	st.lastError, st.failures, st.retryAt, st.ccRetryAt = nil, 0, time.Time{}, time.Time{}
	m.mu.Unlock()
	m.logger().Info("consent created", zap.String("tenant", tenant))
}

// consentRevoked notes that a customer revoked the consent: its cached
// token is dropped and its requests are refused until a new consent or
// refresh token arrives.
func (m *tokenManager) consentRevoked(tenant string) {
	m.mu.Lock()
	st := m.state(tenant)
	st.consentRevoked = true
	st.lastError = &tokenError{failure: failConsentRevoked}
	m.mu.Unlock()
	// A token request in flight may cache its token after this: wait for it
	// (joining its flight, or taking the slot so none starts), then drop.
	_, _, _ = m.flights.Do(tenant, func() (any, error) {
		return nil, &tokenError{failure: failConsentRevoked}
	})
	m.invalidate(tenant, nil)
	m.logger().Warn("consent revoked: requests for the tenant are refused until it authorizes again", zap.String("tenant", tenant))
}

// revokedError is the answer for a tenant whose consent was revoked.
func (m *tokenManager) revokedError(tenant string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if st := m.tenants[tenant]; st != nil && st.consentRevoked {
		return &tokenError{failure: failConsentRevoked}
	}
	return nil
}
