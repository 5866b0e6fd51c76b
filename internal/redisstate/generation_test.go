package redisstate

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/ratelimit"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"go.uber.org/zap"
)

// revalidationOwner records the tenants it is asked to revalidate.
type revalidationOwner struct {
	limiterOwner
	mu      sync.Mutex
	tenants []string
}

func (o *revalidationOwner) RevalidateTenant(tenant string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.tenants = append(o.tenants, tenant)
}

func (o *revalidationOwner) revalidated() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.tenants)
}

// An event bumps its tenant's generation, and the turn script answers it:
// a sidecar that never read the event (nothing here applies events: as if
// every message were lost) revalidates the tenant on its next turn, once,
// and only that tenant. The sidecar that published does not revalidate
// for its own change.
func TestTurnAnswersTheGenerationEventsBump(t *testing.T) {
	r, _ := startLimiterRedis(t)
	opts, err := ParseRedisURL(r.URL())
	if err != nil {
		t.Fatal(err)
	}
	clk := clock.New()
	var owners [2]*revalidationOwner
	var lims [2]*Limiter
	for i := range owners {
		owners[i] = &revalidationOwner{limiterOwner: limiterOwner{clk: clk}}
		c := New(t.Name(), owners[i], opts, r.URL(), zap.NewNop(), func() {})
		t.Cleanup(func() { _ = c.Destruct() })
		lims[i] = NewLimiter(c, 25, 5*time.Second, ratelimit.New(25, 5*time.Second, clk))
	}
	a, b := lims[0], lims[1]
	turn := func(l *Limiter, tenant string) {
		t.Helper()
		if _, err := l.Wait(context.Background(), tenant, time.Second); err != nil {
			t.Fatalf("turn for %s: %v", tenant, err)
		}
	}
	const tenant, other = "1800001", "1800002"
	for _, l := range lims {
		turn(l, tenant)
		turn(l, other)
	}
	if got := owners[1].revalidated(); len(got) != 0 {
		t.Fatalf("b revalidated %v before any event, want nothing (a new tenant's generation is 0)", got)
	}

	ctx := context.Background()
	if err := a.c.Backend().Publish(ctx, tokens.Event{Kind: "forget", Tenant: tenant, Account: "anna"}); err != nil {
		t.Fatal(err)
	}
	turn(b, other)
	if got := owners[1].revalidated(); len(got) != 0 {
		t.Fatalf("b revalidated %v on another tenant's turn", got)
	}
	turn(b, tenant)
	if got := owners[1].revalidated(); !slices.Equal(got, []string{tenant}) {
		t.Fatalf("b revalidated %v on its first turn after the event, want [%s]", got, tenant)
	}
	turn(b, tenant)
	if got := owners[1].revalidated(); len(got) != 1 {
		t.Fatalf("b revalidated %v: again on a later turn with no new event", got)
	}
	turn(a, tenant)
	if got := owners[0].revalidated(); len(got) != 0 {
		t.Fatalf("a revalidated %v after its own event", got)
	}

	// A sidecar that meets the tenant first after it changed revalidates
	// (what it holds may predate the change).
	c := New(t.Name(), owners[1], opts, r.URL(), zap.NewNop(), func() {})
	t.Cleanup(func() { _ = c.Destruct() })
	fresh := NewLimiter(c, 25, 5*time.Second, ratelimit.New(25, 5*time.Second, clk))
	turn(fresh, tenant)
	if got := owners[1].revalidated(); len(got) != 2 {
		t.Fatalf("a new connection's first turn of a changed tenant: revalidated %v, want a second %s", got, tenant)
	}
}
