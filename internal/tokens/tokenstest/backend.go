// Package tokenstest holds the conformance suites of the tokens seams: one
// suite per seam, run against every implementation (as oauth2-proxy runs
// one session-store suite against every store). Each promise of the seam is
// one case (t.Run), so that a broken promise names itself.
package tokenstest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
)

// BackendCaps says what a Backend keeps beyond one process, where the
// implementations legitimately differ: the in-process LocalBackend is one
// sidecar (its memory cache is all, the manager's single flight serializes
// its token requests), Redis is a cluster of them. A case that a backend
// cannot keep is checked for what the backend does promise instead, or
// skipped with the reason when it promises nothing.
type BackendCaps struct {
	// Shared: the backends newBackend makes for one test are sidecars of
	// one client id, and what one keeps the others see. Without it each
	// is a process of its own, and the cases use one.
	Shared bool
	// SharedTokens: StoreToken, LoadToken and DropToken keep access tokens
	// for the other sidecars. Without it the memory cache is all:
	// LoadToken answers nil, StoreToken and DropToken do nothing.
	SharedTokens bool
	// TokenLock: LockToken excludes a second holder until unlock. Without
	// it the manager's single flight is enough, and LockToken only hands
	// back an unlock.
	TokenLock bool
	// Kill makes b's sidecar die as a crashed one would: it stops
	// answering and lets go of nothing. LockExpiry is how soon a lock of a
	// dead holder frees itself. Nil: nothing expires (no case).
	Kill       func(b tokens.Backend)
	LockExpiry time.Duration
	// Listen records the events b's sidecar applies from the other
	// sidecars (Owner.ApplyEvent in production). It returns once b hears
	// them; applied reports what it applied so far. Nil: events reach no
	// other sidecar.
	Listen func(t *testing.T, b tokens.Backend) (applied func() []tokens.Event)
	// Healthy, checked after each case on every backend it made (but
	// killed ones), says whether b answered from its shared store rather
	// than from an in-process fallback, which would keep most promises
	// within one sidecar and so hide a broken script. Nil: not checked.
	Healthy func(b tokens.Backend) error
}

// The subjects the cases use: a tenant's service account and a named
// account of it, both valid (events about invalid ones are dropped).
var (
	tenant  = tokens.Subject{Tenant: "1234567"}
	account = tokens.Subject{Tenant: "1234567", Account: "anna"}
	other   = tokens.Subject{Tenant: "7654321"}
)

// BackendSuite runs every promise of tokens.Backend against the backends
// newBackend makes. newBackend is called one or more times per case with
// the case's t; with caps.Shared, the backends of one t are sidecars of one
// client id, and those of different cases share nothing.
func BackendSuite(t *testing.T, newBackend func(t *testing.T) tokens.Backend, caps BackendCaps) {
	run := func(name string, body func(t *testing.T, s *sidecars)) {
		t.Run(name, func(t *testing.T) {
			s := &sidecars{t: t, newBackend: newBackend, caps: caps, dead: map[tokens.Backend]bool{}}
			defer s.checkHealthy()
			body(t, s)
		})
	}
	run("StoreLoadToken", storeLoadToken)
	run("DropTokenComparesAndDrops", dropTokenComparesAndDrops)
	run("LockTokenExcludes", lockTokenExcludes)
	run("LockTokenOfDeadHolderExpires", lockTokenOfDeadHolderExpires)
	run("TokenSlot", tokenSlot)
	run("TokenSlotHonoursContext", tokenSlotHonoursContext)
	run("PublishReachesOthers", publishReachesOthers)
	run("FirstUse", firstUse)
	run("KeepResult", keepResult)
	run("NewerEvent", newerEvent)
	run("AllowInvalidation", allowInvalidation)
}

// sidecars makes the backends of one case.
type sidecars struct {
	t          *testing.T
	newBackend func(t *testing.T) tokens.Backend
	caps       BackendCaps
	made       []tokens.Backend
	dead       map[tokens.Backend]bool
}

// two returns two sidecars of one client id, or the same backend twice
// when backends share nothing.
func (s *sidecars) two() (a, b tokens.Backend) {
	a = s.one()
	if !s.caps.Shared {
		return a, a
	}
	return a, s.one()
}

func (s *sidecars) one() tokens.Backend {
	b := s.newBackend(s.t)
	s.made = append(s.made, b)
	return b
}

func (s *sidecars) kill(b tokens.Backend) {
	s.caps.Kill(b)
	s.dead[b] = true
}

func (s *sidecars) checkHealthy() {
	if s.caps.Healthy == nil {
		return
	}
	for i, b := range s.made {
		if s.dead[b] {
			continue
		}
		if err := s.caps.Healthy(b); err != nil {
			s.t.Errorf("sidecar %d answered from its fallback, not the shared store: %v", i, err)
		}
	}
}

// ctx bounds one call: no case waits longer.
func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

// eventually polls cond every 10 ms until it holds, or fails the case
// after within.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// done runs fn in a goroutine; the channel carries its error.
func done(fn func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- fn() }()
	return ch
}

// returnedWithin says whether ch delivered within d, and what.
func returnedWithin(ch <-chan error, d time.Duration) (bool, error) {
	select {
	case err := <-ch:
		return true, err
	case <-time.After(d):
		return false, nil
	}
}

func sameToken(a, b *tokens.SharedToken) bool {
	return a != nil && b != nil && a.AccessToken == b.AccessToken && a.Grant == b.Grant &&
		a.IssuedAt.Equal(b.IssuedAt) && a.ExpiresAt.Equal(b.ExpiresAt)
}

func newToken(access string, lives time.Duration) *tokens.SharedToken {
	now := time.Now().Truncate(time.Millisecond)
	return &tokens.SharedToken{AccessToken: access, Grant: tokens.GrantClientCredentials, IssuedAt: now, ExpiresAt: now.Add(lives)}
}

// A shared access token round-trips, to every sidecar, per subject, and
// is gone once it expires.
func storeLoadToken(t *testing.T, s *sidecars) {
	c := ctx(t)
	a, b := s.two()
	if got, err := a.LoadToken(c, tenant); err != nil || got != nil {
		t.Fatalf("LoadToken before any StoreToken: %+v, %v; want nil, nil", got, err)
	}
	tok := newToken("access-1", 400*time.Millisecond)
	if err := a.StoreToken(c, tenant, tok); err != nil {
		t.Fatalf("StoreToken: %v", err)
	}
	if !s.caps.SharedTokens {
		// The memory cache is all: nothing to load.
		if got, err := b.LoadToken(c, tenant); err != nil || got != nil {
			t.Errorf("LoadToken of a backend that shares no tokens: %+v, %v; want nil, nil", got, err)
		}
		return
	}
	for i, sc := range []tokens.Backend{a, b} {
		if got, err := sc.LoadToken(c, tenant); err != nil || !sameToken(got, tok) {
			t.Errorf("sidecar %d: LoadToken after StoreToken: %+v, %v; want %+v", i, got, err, tok)
		}
	}
	if got, err := b.LoadToken(c, account); err != nil || got != nil {
		t.Errorf("LoadToken of another subject (an account of the tenant): %+v, %v; want nil, nil", got, err)
	}
	acc := newToken("access-anna", time.Hour)
	if err := b.StoreToken(c, account, acc); err != nil {
		t.Fatalf("StoreToken of the account: %v", err)
	}
	if got, err := a.LoadToken(c, account); err != nil || !sameToken(got, acc) {
		t.Errorf("LoadToken of the account: %+v, %v; want %+v", got, err, acc)
	}
	if got, err := a.LoadToken(c, tenant); err != nil || !sameToken(got, tok) {
		t.Errorf("the tenant's token after the account's was stored: %+v, %v", got, err)
	}
	eventually(t, 3*time.Second, "the shared token to expire", func() bool {
		got, err := b.LoadToken(c, tenant)
		return err == nil && got == nil
	})
	if got, err := a.LoadToken(c, account); err != nil || !sameToken(got, acc) {
		t.Errorf("the account's token (an hour to live) once the tenant's expired: %+v, %v", got, err)
	}
}

// DropToken drops the subject's token only if it is still the one named
// (a 401 on an older token keeps the newer one), and tells the other
// sidecars, naming the token by its hash.
func dropTokenComparesAndDrops(t *testing.T, s *sidecars) {
	c := ctx(t)
	a, b := s.two()
	var applied func() []tokens.Event
	if s.caps.Listen != nil {
		applied = s.caps.Listen(t, b)
	}
	newer := newToken("newer-token", time.Hour)
	if err := a.StoreToken(c, tenant, newer); err != nil {
		t.Fatalf("StoreToken: %v", err)
	}
	if err := a.DropToken(c, tenant, "older-token"); err != nil {
		t.Fatalf("DropToken of an older token: %v", err)
	}
	if !s.caps.SharedTokens {
		if err := a.DropToken(c, tenant, "newer-token"); err != nil {
			t.Errorf("DropToken: %v", err)
		}
		return
	}
	if got, err := b.LoadToken(c, tenant); err != nil || !sameToken(got, newer) {
		t.Errorf("after DropToken of an older token: %+v, %v; want the newer token kept", got, err)
	}
	if err := a.DropToken(c, account, "newer-token"); err != nil {
		t.Fatalf("DropToken of another subject: %v", err)
	}
	if got, err := b.LoadToken(c, tenant); err != nil || !sameToken(got, newer) {
		t.Errorf("after DropToken of the same token for another subject: %+v, %v; want it kept", got, err)
	}
	if err := a.DropToken(c, tenant, "newer-token"); err != nil {
		t.Fatalf("DropToken of the token itself: %v", err)
	}
	if got, err := b.LoadToken(c, tenant); err != nil || got != nil {
		t.Errorf("after DropToken of the token itself: %+v, %v; want it gone", got, err)
	}
	if applied == nil {
		return
	}
	want := tokens.TokenHash("newer-token")
	eventually(t, 3*time.Second, "the other sidecar to apply the invalidation", func() bool {
		for _, ev := range applied() {
			if ev.Kind == tokens.EventInvalidate && ev.Tenant == tenant.Tenant && ev.Account == "" && ev.TokenHash == want {
				return true
			}
		}
		return false
	})
	for _, ev := range applied() {
		if ev.TokenHash == "" || ev.TokenHash == "newer-token" || ev.TokenHash == "older-token" {
			t.Errorf("an invalidation names its token by its hash only: %+v", ev)
		}
	}
}

// LockToken excludes a second holder, of this sidecar or another, until
// unlock, also past the lock's expiry while its holder lives; another
// subject's lock is another lock.
func lockTokenExcludes(t *testing.T, s *sidecars) {
	c := ctx(t)
	a, b := s.two()
	unlock, err := a.LockToken(c, tenant)
	if err != nil {
		t.Fatalf("LockToken: %v", err)
	}
	if !s.caps.TokenLock {
		// Nothing to do: the single flight serializes in the process.
		got := done(func() error {
			u, err := b.LockToken(c, tenant)
			if err == nil {
				u()
			}
			return err
		})
		if ok, err := returnedWithin(got, time.Second); !ok || err != nil {
			t.Errorf("a second LockToken of a backend without token locks: returned %v, %v; want at once", ok, err)
		}
		unlock()
		return
	}
	other, err := b.LockToken(c, account)
	if err != nil {
		t.Fatalf("LockToken of another subject while the tenant's is held: %v", err)
	}
	other()
	var second func()
	got := done(func() error {
		var err error
		second, err = b.LockToken(c, tenant)
		return err
	})
	hold := max(2*s.caps.LockExpiry, 300*time.Millisecond)
	if ok, err := returnedWithin(got, hold); ok {
		unlock()
		t.Fatalf("a second LockToken returned (%v) while the first was held", err)
	}
	unlock()
	if ok, err := returnedWithin(got, 3*time.Second); !ok || err != nil {
		t.Fatalf("the second LockToken once the first was unlocked: returned %v, %v", ok, err)
	}
	// The second holder excludes the first sidecar in turn.
	third := done(func() error {
		u, err := a.LockToken(c, tenant)
		if err == nil {
			u()
		}
		return err
	})
	if ok, _ := returnedWithin(third, 100*time.Millisecond); ok {
		t.Error("LockToken returned while another sidecar held the lock")
	}
	second()
	if ok, err := returnedWithin(third, 3*time.Second); !ok || err != nil {
		t.Errorf("LockToken once the other sidecar unlocked: returned %v, %v", ok, err)
	}
}

// The lock of a sidecar that died frees itself.
func lockTokenOfDeadHolderExpires(t *testing.T, s *sidecars) {
	if !s.caps.TokenLock || s.caps.Kill == nil {
		// In one process no lock outlives its holder: the in-process
		// LockToken holds nothing (the single flight is the exclusion),
		// so a caller is never kept waiting by one that went away.
		c := ctx(t)
		a := s.one()
		if _, err := a.LockToken(c, tenant); err != nil { // never unlocked: its holder "died"
			t.Fatalf("LockToken: %v", err)
		}
		done := make(chan error, 1)
		go func() {
			unlock, err := a.LockToken(c, tenant)
			if err == nil {
				unlock()
			}
			done <- err
		}()
		if ok, err := returnedWithin(done, time.Second); !ok || err != nil {
			t.Errorf("LockToken after a holder that never unlocked: returned %v, %v", ok, err)
		}
		return
	}
	c := ctx(t)
	a := s.one()
	b := s.one()
	if _, err := a.LockToken(c, tenant); err != nil {
		t.Fatalf("LockToken: %v", err)
	}
	s.kill(a)
	start := time.Now()
	unlock, err := b.LockToken(c, tenant)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("LockToken after the holder died: %v (after %v)", err, took)
	}
	unlock()
	// The holder refreshed its lock to LockExpiry at most LockExpiry/3
	// before it died.
	if took < s.caps.LockExpiry/2 || took > s.caps.LockExpiry+2*time.Second {
		t.Errorf("the dead holder's lock freed itself after %v, want about %v", took, s.caps.LockExpiry)
	}
}

// TokenSlot admits at most max holders at once across the client id's
// sidecars; one more waits up to wait, and gets a slot as soon as one is
// released.
func tokenSlot(t *testing.T, s *sidecars) {
	c := ctx(t)
	a, b := s.two()
	const slots = 2
	r1, err := a.TokenSlot(c, slots, time.Second)
	if err != nil {
		t.Fatalf("the first slot: %v", err)
	}
	r2, err := b.TokenSlot(c, slots, time.Second)
	if err != nil {
		t.Fatalf("the second slot: %v", err)
	}
	wait := 200 * time.Millisecond
	start := time.Now()
	if r, err := a.TokenSlot(c, slots, wait); err == nil {
		r()
		t.Fatalf("a third slot of %d", slots)
	}
	if took := time.Since(start); took < wait/2 || took > wait+time.Second {
		t.Errorf("a third slot was refused after %v, want after its wait of %v", took, wait)
	}
	var r3 func()
	got := done(func() error {
		var err error
		r3, err = a.TokenSlot(c, slots, 5*time.Second)
		return err
	})
	if ok, err := returnedWithin(got, 150*time.Millisecond); ok {
		t.Fatalf("a waiting slot returned (%v) with every slot held", err)
	}
	r1() // released by the first sidecar, taken by the waiter
	if ok, err := returnedWithin(got, 2*time.Second); !ok || err != nil {
		t.Fatalf("a waiting slot once one was released: returned %v, %v", ok, err)
	}
	r2()
	r3()
	// Released slots are free again: max at once, at once.
	var releases []func()
	for i := range slots {
		r, err := b.TokenSlot(c, slots, 100*time.Millisecond)
		if err != nil {
			t.Fatalf("slot %d of %d once every slot was released: %v", i+1, slots, err)
		}
		releases = append(releases, r)
	}
	for _, r := range releases {
		r()
	}
}

// A caller whose context ends while every slot is held gets no slot and an
// error, at once: the end of its context is not an outage of the store, and
// no slot is handed out past max.
func tokenSlotHonoursContext(t *testing.T, s *sidecars) {
	c := ctx(t)
	a, b := s.two()
	const slots = 1
	held, err := a.TokenSlot(c, slots, time.Second)
	if err != nil {
		t.Fatalf("the slot: %v", err)
	}
	defer held()
	gone, cancel := context.WithCancel(c)
	cancel()
	start := time.Now()
	if r, err := b.TokenSlot(gone, slots, 2*time.Second); err == nil {
		r()
		t.Fatalf("a slot for a caller whose context had ended, with all %d held", slots)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("a caller whose context had ended waited %v for its refusal", took)
	}
	// The store still counts the held slot: one more caller waits.
	if r, err := b.TokenSlot(c, slots, 100*time.Millisecond); err == nil {
		r()
		t.Errorf("a second slot of %d after a cancelled caller", slots)
	}
}

// Publish reaches every other sidecar (and not the one that sent it),
// with what it says; an event about an invalid tenant reaches none.
func publishReachesOthers(t *testing.T, s *sidecars) {
	c := ctx(t)
	if s.caps.Listen == nil {
		a := s.one()
		if err := a.Publish(c, tokens.Event{Kind: "consent_created", Tenant: tenant.Tenant}); err != nil {
			t.Errorf("Publish: %v", err)
		}
		return
	}
	a, b := s.one(), s.one()
	third := s.one()
	appliedA, appliedB, applied3 := s.caps.Listen(t, a), s.caps.Listen(t, b), s.caps.Listen(t, third)
	at := time.Now().UTC().Truncate(time.Millisecond)
	if err := a.Publish(c, tokens.Event{Kind: "consent_created", Tenant: "0123"}); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	sent := tokens.Event{Kind: "consent_revoked", Tenant: tenant.Tenant, Account: account.Account, At: at}
	if err := a.Publish(c, sent); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	for name, applied := range map[string]func() []tokens.Event{"the second sidecar": appliedB, "the third sidecar": applied3} {
		eventually(t, 3*time.Second, name+" to apply the event", func() bool { return len(applied()) > 0 })
		evs := applied()
		if len(evs) != 1 {
			t.Errorf("%s applied %d events, want the valid one only: %+v", name, len(evs), evs)
		}
		ev := evs[len(evs)-1]
		if ev.Kind != sent.Kind || ev.Tenant != sent.Tenant || ev.Account != sent.Account || !ev.At.Equal(at) || ev.Origin == "" {
			t.Errorf("%s applied %+v, want %+v from another origin", name, ev, sent)
		}
	}
	// One after the other on one channel: had the sender heard itself,
	// it would have by now.
	if evs := appliedA(); len(evs) != 0 {
		t.Errorf("the sending sidecar applied its own events: %+v", evs)
	}
	// An event without a time is stamped when sent.
	before := time.Now().Add(-time.Second)
	if err := b.Publish(c, tokens.Event{Kind: "forget", Tenant: other.Tenant, Account: "bo"}); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	eventually(t, 3*time.Second, "the first sidecar to apply the second sidecar's event", func() bool { return len(appliedA()) > 0 })
	if ev := appliedA()[0]; ev.Tenant != other.Tenant || ev.Account != "bo" || ev.At.Before(before) || ev.At.After(time.Now().Add(time.Second)) {
		t.Errorf("the event without a time arrived as %+v, want stamped with the time it was sent", ev)
	}
}

// FirstUse is true once per name within its ttl, for all sidecars, and
// true again once the ttl has passed.
func firstUse(t *testing.T, s *sidecars) {
	c := ctx(t)
	a, b := s.two()
	ttl := 300 * time.Millisecond
	must := func(sc tokens.Backend, name string, want bool, what string) {
		t.Helper()
		if got, err := sc.FirstUse(c, name, ttl); err != nil || got != want {
			t.Errorf("%s: FirstUse(%q) = %v, %v; want %v", what, name, got, err, want)
		}
	}
	must(a, "state-1", true, "the first use")
	must(a, "state-1", false, "a second use")
	must(b, "state-1", false, "a use by another sidecar")
	must(b, "state-2", true, "another name's first use")
	eventually(t, 3*time.Second, "the first use to be forgotten after its ttl", func() bool {
		fresh, err := b.FirstUse(c, "state-1", ttl)
		return err == nil && fresh
	})
	must(a, "state-1", false, "a use right after the name was used again")
}

// KeepResult keeps a flow's result for ttl, for all sidecars; FlowResult
// answers "" for none.
func keepResult(t *testing.T, s *sidecars) {
	c := ctx(t)
	a, b := s.two()
	check := func(sc tokens.Backend, name, want, what string) {
		t.Helper()
		if got, err := sc.FlowResult(c, name); err != nil || got != want {
			t.Errorf("%s: FlowResult(%q) = %q, %v; want %q", what, name, got, err, want)
		}
	}
	check(a, "connect-result:s1", "", "before any result was kept")
	if err := a.KeepResult(c, "connect-result:s1", "sealed-1", 400*time.Millisecond); err != nil {
		t.Fatalf("KeepResult: %v", err)
	}
	check(a, "connect-result:s1", "sealed-1", "the kept result")
	check(b, "connect-result:s1", "sealed-1", "the kept result, read by another sidecar")
	check(b, "connect-result:s2", "", "another name")
	if err := b.KeepResult(c, "connect-result:s1", "sealed-2", 400*time.Millisecond); err != nil {
		t.Fatalf("KeepResult: %v", err)
	}
	check(a, "connect-result:s1", "sealed-2", "a result kept again")
	if err := a.KeepResult(c, "connect-result:s3", "sealed-3", time.Hour); err != nil {
		t.Fatalf("KeepResult: %v", err)
	}
	eventually(t, 3*time.Second, "the kept result to expire", func() bool {
		got, err := b.FlowResult(c, "connect-result:s1")
		return err == nil && got == ""
	})
	check(b, "connect-result:s3", "sealed-3", "a result kept for an hour, once another expired")
}

// NewerEvent accepts a consent event's stamp only when it is newer than
// every one accepted before for the tenant, across the sidecars.
func newerEvent(t *testing.T, s *sidecars) {
	c := ctx(t)
	a, b := s.two()
	at := time.Now().Truncate(time.Millisecond)
	check := func(sc tokens.Backend, tenant string, stamp time.Time, want bool, what string) {
		t.Helper()
		if got, err := sc.NewerEvent(c, tenant, stamp); err != nil || got != want {
			t.Errorf("%s: NewerEvent = %v, %v; want %v", what, got, err, want)
		}
	}
	check(a, tenant.Tenant, at, true, "the first event")
	check(a, tenant.Tenant, at, false, "the same event again")
	check(a, tenant.Tenant, at.Add(-time.Millisecond), false, "an older event")
	check(b, tenant.Tenant, at, false, "the same event at another sidecar")
	check(a, other.Tenant, at.Add(-time.Second), true, "another tenant's first event, older than this one's")
	check(b, tenant.Tenant, at.Add(time.Millisecond), true, "a newer event")
	check(a, tenant.Tenant, at.Add(time.Millisecond), false, "that newer event at another sidecar")
	check(a, tenant.Tenant, at, false, "the first event replayed after a newer one")
	check(a, other.Tenant, at.Add(-time.Second), false, "the other tenant's event again")
	// Stamps are nanoseconds, beyond a float's 53 bits: one a nanosecond
	// later is newer, one a nanosecond earlier is not.
	ns := at.Add(time.Hour)
	check(a, tenant.Tenant, ns, true, "an event an hour later")
	check(b, tenant.Tenant, ns.Add(time.Nanosecond), true, "an event a nanosecond after it")
	check(a, tenant.Tenant, ns, false, "the event a nanosecond before the newest")
}

// AllowInvalidation allows at most max per subject per window, across the
// sidecars, and allows again once the window has passed.
func allowInvalidation(t *testing.T, s *sidecars) {
	c := ctx(t)
	a, b := s.two()
	const most = 2
	window := 300 * time.Millisecond
	check := func(sc tokens.Backend, subj tokens.Subject, want bool, what string) {
		t.Helper()
		if got, err := sc.AllowInvalidation(c, subj, most, window); err != nil || got != want {
			t.Errorf("%s: AllowInvalidation(%s) = %v, %v; want %v", what, subj.Key(), got, err, want)
		}
	}
	start := time.Now()
	for i := range most {
		check(a, tenant, true, fmt.Sprintf("invalidation %d of %d", i+1, most))
	}
	check(b, tenant, false, "one more in the window, at another sidecar")
	check(a, tenant, false, "one more in the window")
	check(b, account, true, "another subject (an account of the tenant)")
	check(a, other, true, "another tenant")
	eventually(t, 3*time.Second, "an invalidation to be allowed after the window", func() bool {
		ok, err := b.AllowInvalidation(c, tenant, most, window)
		return err == nil && ok
	})
	if took := time.Since(start); took < window*3/4 {
		t.Errorf("allowed again after %v, within the window of %v", took, window)
	}
}
