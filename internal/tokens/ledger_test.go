package tokens

import (
	"runtime"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
)

// Idle tenants are forgotten; those whose state still matters are kept.
func TestForgetIdleTenants(t *testing.T) {
	t.Parallel()
	clk := clock.New() // this manager's own: moving it moves no other test
	m := NewManager("http://127.0.0.1:1/token", "sweep-client", clk)
	defer m.Destruct()
	m.Store(Subject{Tenant: "1000001"}, GrantClientCredentials, &Answer{AccessToken: "a", Lifetime: time.Hour}, time.Minute)
	m.ledger.update("1000001", func(st *TenantState) { st.Mode = GrantClientCredentials }) // has a token: kept
	m.ledger.update("1000002", func(st *TenantState) { st.Mode = GrantClientCredentials }) // idle: forgotten
	m.ledger.update("1000003", func(st *TenantState) { st.ConsentRevoked = true })         // revoked: kept
	m.ledger.update("1000004", func(st *TenantState) { st.Unsaved = &Record{} })           // unsaved refresh token: kept
	m.ledger.update("1000005", func(st *TenantState) {                                     // a recent error: kept for a while
		st.LastError, st.RetryAt = &Error{Failure: FailUnavailable}, clk.Now()
	})

	m.ForgetIdleTenants()
	if got := tenantsKnown(m); got != "1000001 1000003 1000004 1000005 " {
		t.Fatalf("after a sweep: %s", got)
	}
	clk.Advance(ForgetErrorsAfter + time.Minute)
	m.ForgetIdleTenants()
	if got := tenantsKnown(m); got != "1000001 1000003 1000004 " {
		t.Fatalf("an hour later: %s", got)
	}
}

func tenantsKnown(m *Manager) string {
	s := ""
	for _, id := range []string{"1000001", "1000002", "1000003", "1000004", "1000005"} {
		if m.ledger.Knows(id) {
			s += id + " "
		}
	}
	return s
}

// A destroyed manager leaves no goroutine behind.
func TestManagerDestructStopsItsGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	for range 20 {
		_ = NewManager("http://127.0.0.1:1/token", "leak-client", clock.New()).Destruct()
	}
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > before+2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines left behind", runtime.NumGoroutine()-before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
