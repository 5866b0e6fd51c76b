package tokens

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

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
// pub/sub is the fast path, the store is the truth. Every subject this
// sidecar remembers or holds a token for is revalidated against the store:
// revocations and new consents broadcast meanwhile are read from the
// tenants' records, a named account whose record is gone (deleted through
// another sidecar) is forgotten, and a cached token the store no longer
// holds (dropped after a 401 elsewhere, through the admin API, or replaced)
// is dropped, so that the next request reads the current one. Calls to the
// shared state are bounded (SharedCallLimit) and run resyncWorkers at a
// time. Resyncs that arrive while a pass runs are folded into one more
// pass after it.
func (m *Manager) Resync() {
	m.journal.wake() // the store answers again: what the journal holds goes first
	if !m.resyncs.begin() {
		return
	}
	for {
		m.revalidator.resyncPass()
		if !m.resyncs.again() {
			return
		}
	}
}

// RevalidateTenant is Resync for one tenant and its named accounts: its
// shared state changed since this sidecar last looked (the limiter's turn
// answered a generation it had not seen), so a broadcast may have been
// missed. The tenant's revocation mark is read again, a deleted account
// is forgotten and a cached token the store no longer holds is dropped,
// before the request that noticed uses its token. A dropped token a
// request already holds is marked (Token.Dropped): the request gets the
// current one.
func (m *Manager) RevalidateTenant(tenant string) {
	s := m.Settings.Load()
	seen := map[string]struct{}{}
	m.ledger.each(func(key string, st *TenantState) {
		if t, _, _ := cutAccount(key); t == tenant {
			st.revocationRead = false
			seen[key] = struct{}{}
		}
	})
	if _, ok := m.Cache.Get(tenant); ok {
		seen[tenant] = struct{}{}
	}
	for key := range m.Cache.Items() {
		if t, _, isAccount := cutAccount(key); isAccount && t == tenant {
			seen[key] = struct{}{}
		}
	}
	for key := range seen {
		switch m.revalidator.revalidate(s, key) {
		case revalidDropped, revalidForgotten:
			_, account, _ := cutAccount(key)
			m.Logger().Info("the subject's shared state changed (a broadcast was missed): its cached state is dropped",
				Subject{Tenant: tenant, Account: account}.LogFields()...)
		}
	}
}

// resyncWorkers is how many subjects are revalidated at once after a
// reconnect: a few hundred take well under a second against a near Redis,
// and a slow one does not hold the pass up (SharedCallLimit per call).
const resyncWorkers = 16

// resyncRuns lets one revalidation pass run at a time; a Resync that comes
// meanwhile asks for one more pass after it (what it must see may have
// changed after the running pass read it).
type resyncRuns struct {
	mu               sync.Mutex
	running, pending bool
}

// begin reports whether the caller runs the passes (none was running).
func (r *resyncRuns) begin() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.running {
		r.pending = true
		return false
	}
	r.running = true
	return true
}

// again reports whether another pass was asked for meanwhile; if not, the
// caller stops running passes.
func (r *resyncRuns) again() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending {
		r.pending = false
		return true
	}
	r.running = false
	return false
}

// revalidator checks what the manager holds against the shared store
// after a reconnect (Resync): tokens, accounts, revocations and 401
// invalidations that pub/sub may have missed.
type revalidator struct{ m *Manager }

// resyncPass revalidates every remembered tenant and every subject with a
// cached token, resyncWorkers at a time.
func (rv revalidator) resyncPass() {
	m := rv.m
	s := m.Settings.Load()
	start := time.Now()
	keys := m.ledger.resync()
	seen := make(map[string]struct{}, len(keys))
	for _, key := range keys {
		seen[key] = struct{}{}
	}
	for key := range m.Cache.Items() {
		if _, dup := seen[key]; !dup {
			seen[key] = struct{}{}
			keys = append(keys, key)
		}
	}
	var dropped, forgotten atomic.Int64
	work := make(chan string)
	var wg sync.WaitGroup
	for range min(resyncWorkers, len(keys)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for key := range work {
				switch rv.revalidate(s, key) {
				case revalidDropped:
					dropped.Add(1)
				case revalidForgotten:
					forgotten.Add(1)
				}
			}
		}()
	}
	for _, key := range keys {
		select {
		case work <- key:
		case <-m.ctx.Done():
		}
		if m.ctx.Err() != nil {
			break
		}
	}
	close(work)
	wg.Wait()
	if dropped.Load() > 0 || forgotten.Load() > 0 {
		m.Logger().Info("revalidated the cached state against the shared store",
			zap.Int("subjects", len(keys)), zap.Int64("tokens_dropped", dropped.Load()),
			zap.Int64("accounts_forgotten", forgotten.Load()), zap.Duration("took", time.Since(start)))
	}
}

// What revalidate did to a subject.
type revalidation int

const (
	revalidKept revalidation = iota
	revalidDropped
	revalidForgotten
)

// revalidate checks one subject (by key) against the store: a revoked
// service-account consent drops the tenant's token; a named account whose
// record is gone is forgotten, as DeleteAccount forgets it; a cached token
// the store no longer holds is dropped (revalidateToken).
func (rv revalidator) revalidate(s *Settings, key string) revalidation {
	m := rv.m
	tenant, account, isAccount := cutAccount(key)
	subj := Subject{Tenant: tenant, Account: account}
	if !isAccount && m.consent.revokedError(s, tenant) != nil {
		if _, cached := m.Cache.Get(key); cached {
			m.drop(subj, nil)
			return revalidDropped
		}
		return revalidKept
	}
	v, cached := m.Cache.Get(key)
	if !cached {
		return revalidKept
	}
	t := v.(*Token)
	var rec *Record
	recRead := false
	if isAccount && s != nil && s.Records != nil {
		ctx, cancel := context.WithTimeout(m.ctx, SharedCallLimit)
		r, err := s.Records.load(ctx, subj)
		cancel()
		if err == nil && r == nil {
			// Deleted through another sidecar (its `forget` was missed).
			m.forget(subj)
			rv.debugResync(subj, "the account's record is gone from the store: the account is forgotten")
			return revalidForgotten
		}
		rec, recRead = r, err == nil
	}
	if rv.revalidateToken(s, subj, t, rec, recRead) {
		m.drop(subj, t)
		return revalidDropped
	}
	return revalidKept
}

// revalidateToken reports whether the cached token t is stale: the store
// holds another token as new or newer, or no longer holds t although t was
// in it (dropped after a 401 elsewhere, through the admin API, or on a
// revocation). Then the next request reads the current one from the store
// (one Redis read; a token request only when the store has none). A token
// the store never held is kept: a client-credentials token fetched while
// the store was unreachable was never seen by another sidecar, and a
// refresh-token chain's token read from its record is checked against the
// record (rec, when recRead; loaded here otherwise). When the store cannot
// be read, nothing is dropped.
func (rv revalidator) revalidateToken(s *Settings, subj Subject, t *Token, rec *Record, recRead bool) bool {
	m := rv.m
	ctx, cancel := context.WithTimeout(m.ctx, SharedCallLimit)
	st, err := m.Shared().LoadToken(ctx, subj)
	cancel()
	switch {
	case err != nil:
		return false
	case st != nil && st.AccessToken == t.accessToken():
		return false
	case st != nil:
		if !st.IssuedAt.Before(t.issuedAt) {
			rv.debugResync(subj, "the shared store holds a newer token: the cached one is dropped")
			return true
		}
		return false // this one is newer (the store may be catching up)
	case t.shared.Load():
		rv.debugResync(subj, "the shared store no longer holds the cached token (dropped by another sidecar): it is dropped here too")
		return true
	case t.grant != GrantRefreshToken || s == nil || s.Records == nil:
		return false
	}
	if !recRead {
		ctx, cancel := context.WithTimeout(m.ctx, SharedCallLimit)
		r, err := s.Records.load(ctx, subj)
		cancel()
		if err != nil || r == nil {
			return false
		}
		rec = r
	}
	if rec == nil || rec.AccessToken == t.accessToken() {
		return false
	}
	if rec.AccessToken == "" || !rec.IssuedAt.Before(t.issuedAt) {
		rv.debugResync(subj, "the record no longer holds the cached token (dropped after a 401, or replaced): it is dropped here too")
		return true
	}
	return false
}

func (rv revalidator) debugResync(subj Subject, msg string) {
	m := rv.m
	if ce := m.Logger().Check(zap.DebugLevel, msg); ce != nil {
		ce.Write(subj.LogFields()...)
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
