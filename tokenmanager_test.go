package fortnox

import (
	"runtime"
	"testing"
	"time"
)

// Idle tenants are forgotten; those whose state still matters are kept.
func TestForgetIdleTenants(t *testing.T) {
	m := newTokenManager("http://127.0.0.1:1/token", "sweep-client")
	defer m.Destruct()
	m.store(subject{tenant: "1000001"}, grantClientCredentials, &tokenAnswer{accessToken: "a", lifetime: time.Hour}, time.Minute)
	m.mu.Lock()
	m.state("1000001").mode = grantClientCredentials // has a token: kept
	m.state("1000002").mode = grantClientCredentials // idle: forgotten
	m.state("1000003").consentRevoked = true         // revoked: kept
	m.state("1000004").unsaved = &tokenRecord{}      // unsaved refresh token: kept
	failed := m.state("1000005")                     // a recent error: kept for a while
	failed.lastError, failed.retryAt = &tokenError{failure: failUnavailable}, clk.Now()
	m.mu.Unlock()

	m.forgetIdleTenants()
	if got := tenantsKnown(m); got != "1000001 1000003 1000004 1000005 " {
		t.Fatalf("after a sweep: %s", got)
	}
	clk.Advance(forgetErrorsAfter + time.Minute)
	m.forgetIdleTenants()
	if got := tenantsKnown(m); got != "1000001 1000003 1000004 " {
		t.Fatalf("an hour later: %s", got)
	}
}

func tenantsKnown(m *tokenManager) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := ""
	for _, id := range []string{"1000001", "1000002", "1000003", "1000004", "1000005"} {
		if m.tenants[id] != nil {
			s += id + " "
		}
	}
	return s
}

// A destroyed manager leaves no goroutine behind.
func TestManagerDestructStopsItsGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	for range 20 {
		_ = newTokenManager("http://127.0.0.1:1/token", "leak-client").Destruct()
	}
	eventually(t, 2*time.Second, "the sweepers to stop", func() bool { return runtime.NumGoroutine() <= before+2 })
}
