package fortnox

import (
	"runtime"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
)

// Idle tenants are forgotten; those whose state still matters are kept.
func TestForgetIdleTenants(t *testing.T) {
	m := tokens.NewManager("http://127.0.0.1:1/token", "sweep-client", clk)
	defer m.Destruct()
	m.Store(tokens.Subject{Tenant: "1000001"}, tokens.GrantClientCredentials, &tokens.Answer{AccessToken: "a", Lifetime: time.Hour}, time.Minute)
	m.Mu.Lock()
	m.State("1000001").Mode = tokens.GrantClientCredentials // has a token: kept
	m.State("1000002").Mode = tokens.GrantClientCredentials // idle: forgotten
	m.State("1000003").ConsentRevoked = true                // revoked: kept
	m.State("1000004").Unsaved = &tokens.Record{}           // unsaved refresh token: kept
	failed := m.State("1000005")                            // a recent error: kept for a while
	failed.LastError, failed.RetryAt = &tokens.Error{Failure: tokens.FailUnavailable}, clk.Now()
	m.Mu.Unlock()

	m.ForgetIdleTenants()
	if got := tenantsKnown(m); got != "1000001 1000003 1000004 1000005 " {
		t.Fatalf("after a sweep: %s", got)
	}
	clk.Advance(tokens.ForgetErrorsAfter + time.Minute)
	m.ForgetIdleTenants()
	if got := tenantsKnown(m); got != "1000001 1000003 1000004 " {
		t.Fatalf("an hour later: %s", got)
	}
}

func tenantsKnown(m *tokens.Manager) string {
	m.Mu.Lock()
	defer m.Mu.Unlock()
	s := ""
	for _, id := range []string{"1000001", "1000002", "1000003", "1000004", "1000005"} {
		if m.Tenants[id] != nil {
			s += id + " "
		}
	}
	return s
}

// A destroyed manager leaves no goroutine behind.
func TestManagerDestructStopsItsGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	for range 20 {
		_ = tokens.NewManager("http://127.0.0.1:1/token", "leak-client", clk).Destruct()
	}
	eventually(t, 2*time.Second, "the sweepers to stop", func() bool { return runtime.NumGoroutine() <= before+2 })
}
