package tokens

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
)

// Defaults for the refresh-token fallback.
const (
	DefaultRetryClientCredentials = time.Hour
	// lockBudget bounds how long a refresh may wait for another process's
	// storage lock (a dead holder's file lock goes stale after about 10s).
	LockBudget = 30 * time.Second
	// refreshCallLimit bounds a refresh-token request once it is sent. It
	// is not token_timeout, and no caller, reload or shutdown cuts it short:
	// Fortnox may already have rotated the refresh token, and its answer
	// holds the only live one.
	RefreshCallLimit = 30 * time.Second
)

// A grant gets a subject a token, after x/oauth2's TokenSource: it
// returns the token, and the Manager caches, shares and records it. stale
// is the token being replaced (nil: none).
type grant interface {
	Grant() Grant
	token(s *Settings, subj Subject, stale *Token) (*Token, error)
}

var (
	_ grant = refreshGrant{}
	_ grant = clientCredentialsGrant{}
)

// refreshGrant is the refresh-token grant: it spends a subject's stored,
// single-use refresh token under the subject's lock, stores the rotated
// one before the new access token is used, and keeps what could not be
// stored. The Manager caches, shares and records what it returns.
type refreshGrant struct{ m *Manager }

// Grant names the grant.
func (refreshGrant) Grant() Grant { return GrantRefreshToken }

// errNoRefreshToken: the subject has no stored refresh token to use.
var errNoRefreshToken = errors.New("no refresh token stored")

// beginRefresh registers a refresh-token request about to be sent, unless
// the manager is being destroyed (then none may start). Destruct waits for
// those registered.
func (m *Manager) beginRefresh() bool {
	m.lifecycle.Lock()
	defer m.lifecycle.Unlock()
	if m.ctx.Err() != nil {
		return false
	}
	m.refreshes.Add(1)
	return true
}

var ErrStopping = errors.New("the sidecar is reloading or stopping")

// spendRefreshToken sends one refresh-token request. Once sent, nothing
// cancels it (see refreshCallLimit). The caller stores its answer before
// anything else, then calls stored: until then a manager being destroyed
// waits (see Destruct).
func (g refreshGrant) spendRefreshToken(s *Settings, refreshToken string) (answer *Answer, took time.Duration, stored func(), err error) {
	m := g.m
	release, err := m.sharing.tokenSlot(s)
	if err != nil {
		return nil, 0, func() {}, err
	}
	defer release()
	if !m.beginRefresh() {
		return nil, 0, func() {}, &Error{Failure: FailUnavailable, Cause: ErrStopping, RetryAt: m.clock.Now().Add(time.Second)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), RefreshCallLimit)
	defer cancel()
	start := time.Now()
	answer, err = m.Client.Refresh(ctx, s.Cred, refreshToken)
	return answer, max(time.Since(start), time.Nanosecond), sync.OnceFunc(m.refreshes.Done), err
}

// token gets a token with the subject's stored refresh token,
// safely across processes: under the subject's storage lock it re-reads
// the record (another replica may have refreshed already: then its access
// token is used), refreshes, and stores the new refresh token before
// anything else. A refresh token Fortnox rejected is marked so that no
// process tries it again; only a new one (admin API) recovers the subject.
// The new access token must name the subject's tenant: one that names
// another is never used (see strand).
func (g refreshGrant) token(s *Settings, subj Subject, stale *Token) (*Token, error) {
	m := g.m
	if s.Records == nil {
		return nil, errNoRefreshToken
	}
	ctx, cancel := context.WithTimeout(m.ctx, LockBudget+s.TokenTimeout)
	defer cancel()
	// What this process rotated and the store has not taken yet goes
	// first: its refresh token is the only live one.
	if err := m.journal.flushSubject(ctx, s, subj); err != nil {
		return nil, g.storageFailure(subj, err)
	}
	if err := g.saveUnsaved(ctx, s, subj); err != nil {
		return nil, g.storageFailure(subj, err)
	}

	// A look without the lock: most tenants have no record at all, and a
	// fresh access token stored by another replica needs no lock either.
	span := m.tracer.storeSpan(subj, OpLoadRecord)
	rec, err := s.Records.load(ctx, subj)
	span.EndErr(err)
	if err != nil {
		return nil, g.storageFailure(subj, err)
	}
	if terr := noRefreshToken(subj, rec); terr != nil {
		return nil, g.failedWithoutRequest(subj, terr)
	}
	if rec == nil || rec.RefreshToken == "" {
		return nil, errNoRefreshToken
	}
	if t, terr := g.useStored(s, subj, rec, stale); t != nil || terr != nil {
		if terr != nil {
			return nil, g.failedWithoutRequest(subj, terr)
		}
		return t, nil
	}
	if terr := g.rotationInFlight(s, subj, rec, false); terr != nil {
		return nil, terr
	}

	var token *Token
	var failure *Error
	var r rotated
	lock := m.tracer.childSpan(subj, SpanLock)
	err = s.Records.withLock(ctx, subj, func() error {
		lock.End(outcomeOK)
		span := m.tracer.storeSpan(subj, OpLoadRecord)
		rec, err := s.Records.load(ctx, subj)
		span.EndErr(err)
		if err != nil {
			return err
		}
		if failure = noRefreshToken(subj, rec); failure != nil {
			return nil
		}
		if rec == nil || rec.RefreshToken == "" {
			return errNoRefreshToken
		}
		if token, failure = g.useStored(s, subj, rec, stale); token != nil || failure != nil {
			return nil
		}
		if !rec.RejectedAt.IsZero() {
			failure = &Error{Failure: FailGrantRejected, Code: "invalid_grant", Description: "rejected earlier; waiting for a new refresh token"}
			return nil
		}
		if failure = g.rotationInFlight(s, subj, rec, true); failure != nil {
			return nil
		}
		// The mark is in the store before the refresh token leaves: no
		// other sidecar spends it meanwhile.
		if err := g.mark(ctx, s, subj, rec); err != nil {
			return err
		}
		if r = g.refreshStored(ctx, s, subj, rec); r.failure != nil {
			failure = r.failure
			return nil
		}
		token = m.CacheToken(subj, GrantRefreshToken, r.answer.AccessToken, r.issued, r.answer.Lifetime, s.RefreshBefore)
		return nil
	})
	lock.EndErr(err) // the lock was not had (when it was, its span ended)
	g.settle(r)
	took := r.took
	switch {
	case errors.Is(err, errNoRefreshToken):
		return nil, errNoRefreshToken
	case err != nil:
		return nil, g.storageFailure(subj, err)
	case failure != nil && failure.Failure == FailRefreshInProgress:
		return nil, failure // no backoff: the rotated token lands shortly
	case failure != nil:
		m.RecordFailure(subj, GrantRefreshToken, failure, took)
		return nil, failure
	}
	if took > 0 {
		m.RecordSuccess(subj, GrantRefreshToken, token, took)
		m.sharing.share(subj, token)
	} else {
		m.ledger.found(subj.Key(), GrantRefreshToken)
	}
	return token, nil
}

// rotated is what one refresh of a stored refresh token gave.
type rotated struct {
	answer   *Answer // nil when it failed
	issued   time.Time
	took     time.Duration // 0: no request was sent
	stranded *strandedToken
	failure  *Error
}

// refreshStored spends rec's refresh token (the caller holds subj's lock)
// and stores the new one before anything else. A refresh token Fortnox
// rejected is marked (refreshRefused); an answer that is another tenant's
// (or user's) is stranded, and the caller calls settle without the lock.
func (g refreshGrant) refreshStored(ctx context.Context, s *Settings, subj Subject, rec *Record) rotated {
	m := g.m
	span := m.tracer.childSpan(subj, SpanTokenRequest, trace.WithAttributes(AttrGrant.String(string(GrantRefreshToken))))
	stopRenewing := g.renewMark(s, subj, rec)
	answer, took, stored, err := g.spendRefreshToken(s, rec.RefreshToken)
	stopRenewing()
	span.endAnswer(answer, err)
	defer stored()
	spent := tokenHash(rec.RefreshToken)
	r := rotated{took: took}
	if err != nil {
		rec.clearMark()
		r.failure = g.refreshRefused(ctx, s, subj, rec, err)
		if r.failure.Failure != FailGrantRejected {
			g.unmark(ctx, s, subj, rec)
		}
		return r
	}
	// The old refresh token is dead now: the new one goes to the journal
	// and to storage before the access token is used.
	if terr := checkTokenBinding(answer.AccessToken, subj, GrantRefreshToken, rec.UserID); terr != nil {
		rec.clearMark()
		r.stranded, r.failure = m.quarantine.strand(ctx, s, subj, rec, answer, terr)
		return r
	}
	r.answer, r.issued = answer, m.clock.Now()
	g.keepAnswer(rec, answer, r.issued, subj)
	journaled := g.journalRotated(s, subj, spent, rec)
	_ = g.storeRotated(ctx, s, subj, rec, journaled)
	return r
}

// journalRotated writes the rotated record to the journal, synced to disk,
// and reports whether it is there.
func (g refreshGrant) journalRotated(s *Settings, subj Subject, spent string, rec *Record) bool {
	m := g.m
	if journalDir(s) == "" {
		return false
	}
	if err := m.journal.write(s, subj, spent, rec); err != nil {
		m.Logger().Error("the rotated refresh token could not be written to the journal (journal_dir): until the store has it, it is only in memory",
			append(subj.LogFields(), zap.Error(err))...)
		return false
	}
	return true
}

// rotationInFlight answers a subject whose record carries another
// holder's live in-flight mark: its refresh token may be spent already,
// so it is not sent again; the rotated one lands shortly (503
// refresh_in_progress). A mark not renewed for rotation_timeout has no live
// holder: the last stored refresh token is then tried once (locked: the
// caller holds the lock and takes the mark itself).
func (g refreshGrant) rotationInFlight(s *Settings, subj Subject, rec *Record, locked bool) *Error {
	m := g.m
	if rec.RotatingBy == "" || rec.RotatingBy == m.holderID {
		return nil
	}
	timeout := rotationTimeout(s)
	n := m.clock.Now()
	last := rec.RotatingSince
	if rec.RotatingRenewed.After(last) {
		last = rec.RotatingRenewed
	}
	if n.Sub(last) >= timeout {
		if locked {
			m.Logger().Warn("a rotation of the refresh token in flight has had no live holder for rotation_timeout: the last stored refresh token is tried once, and Fortnox's answer decides",
				append(subj.LogFields(), zap.Time("rotating_since", rec.RotatingSince), zap.Time("renewed_at", rec.RotatingRenewed), zap.Duration("rotation_timeout", timeout))...)
		}
		return nil
	}
	return &Error{Failure: FailRefreshInProgress, RetryAt: n.Add(time.Second)}
}

// rotationTimeout is s's rotation_timeout.
func rotationTimeout(s *Settings) time.Duration {
	if s.RotationTimeout <= 0 {
		return DefaultRotationTimeout
	}
	return s.RotationTimeout
}

// markRenewal is how often a holder renews its mark: every
// MarkRenewInterval, and at least four times per rotation_timeout, so
// that a live holder's mark never looks stale.
func markRenewal(s *Settings) time.Duration {
	return min(MarkRenewInterval, rotationTimeout(s)/4)
}

// mark writes the in-flight mark into rec and the store (the caller holds
// the subject's lock). An error: the mark is not stored, and the refresh
// token is not sent.
func (g refreshGrant) mark(ctx context.Context, s *Settings, subj Subject, rec *Record) error {
	m := g.m
	n := m.clock.Now().UTC()
	rec.RotatingBy, rec.RotatingSince, rec.RotatingRenewed = m.holderID, n, n
	span := m.tracer.storeSpan(subj, OpSaveRecord)
	err := s.Records.saveHard(ctx, subj, rec)
	span.EndErr(err)
	if err != nil {
		rec.clearMark()
	}
	return err
}

// unmark clears the mark after a refresh that rotated nothing (best
// effort: a mark left behind is given up after rotation_timeout).
func (g refreshGrant) unmark(ctx context.Context, s *Settings, subj Subject, rec *Record) {
	if err := s.Records.save(context.WithoutCancel(ctx), subj, rec); err != nil {
		g.m.Logger().Warn("could not clear the in-flight mark of a refresh that rotated nothing; other sidecars answer refresh_in_progress until rotation_timeout",
			append(subj.LogFields(), zap.Error(err))...)
	}
}

// renewMark renews rec's in-flight mark in the store (see markRenewal)
// until the returned stop is called (which waits for a
// renewal being written: the rotated record is written after it).
func (g refreshGrant) renewMark(s *Settings, subj Subject, rec *Record) (stop func()) {
	m := g.m
	marked := *rec
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		every := markRenewal(s)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			marked.RotatingRenewed = m.clock.Now().UTC()
			ctx, cancel := context.WithTimeout(context.Background(), every)
			_ = s.Records.save(ctx, subj, &marked)
			cancel()
		}
	}()
	return func() {
		close(done)
		<-exited
	}
}

// settle says where a stranded refresh token went: the quarantine, never
// another tenant's record.
func (g refreshGrant) settle(r rotated) {
	if r.stranded != nil {
		r.failure.detail = "The new refresh token Fortnox returned was " + quarantinedWhere(r.stranded) + "."
	}
}

// storeRotated writes a record that holds a new refresh token (the old one
// is dead), and deletes its journal entry once the store has it. If
// storage still fails, the journal keeps it (journaled) and the background
// retry writes it when the store answers again; without a journal entry it
// is kept in memory and written before any further refresh of the subject,
// and the loudest line says so.
func (g refreshGrant) storeRotated(ctx context.Context, s *Settings, subj Subject, rec *Record, journaled bool) error {
	m := g.m
	span := m.tracer.storeSpan(subj, OpSaveRecord)
	var err error
	if journaled {
		// The journal holds it: one try, and the background retry does
		// the rest, so the new access token is not held up by a store
		// that is down.
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), journalWriteLimit)
		err = s.Records.save(wctx, subj, rec)
		cancel()
	} else {
		err = s.Records.saveHard(ctx, subj, rec)
	}
	span.EndErr(err)
	switch {
	case err == nil && journaled:
		m.journal.remove(s, subj)
	case err != nil && journaled:
		m.journal.pending.Store(true)
		m.Logger().Error("the new refresh token could not be saved to the store: it is kept in the journal (journal_dir) and written to the store as soon as it answers again, also after a restart on the same disk",
			append(subj.LogFields(), zap.Error(err))...)
	case err != nil:
		m.ledger.keepUnsaved(subj.Key(), rec)
		m.Logger().Error("THE NEW REFRESH TOKEN COULD NOT BE SAVED: it is kept in memory and written on the next token request for the tenant; do not restart this process before storage works again",
			append(subj.LogFields(), zap.Error(err))...)
	}
	return err
}

// noRefreshToken explains a record that holds no usable refresh token
// because of something the operator must see: it was marked as another
// tenant's. nil otherwise.
func noRefreshToken(subj Subject, rec *Record) *Error {
	if rec == nil || rec.RefreshToken != "" || rec.MismatchTenant == "" {
		return nil
	}
	return &Error{Failure: FailTenantMismatch, Tenant: subj.Tenant, TokenTenant: rec.MismatchTenant,
		detail: "The refresh token it held was spent at " + rec.MismatchAt.Format(time.RFC3339) + "; the new one was kept in the quarantine then (see the log and GET /fortnox/tenants)."}
}

// keepAnswer puts a refresh answer into the record.
func (g refreshGrant) keepAnswer(rec *Record, answer *Answer, issued time.Time, subj Subject) {
	m := g.m
	if answer.RefreshToken != "" {
		rec.RefreshToken = answer.RefreshToken
		rec.RefreshTokenAt = issued.UTC()
	} else {
		m.Logger().Warn("Fortnox's refresh answer had no new refresh token; keeping the old one", subj.LogFields()...)
	}
	if user := tokenUserID(answer.AccessToken); user != "" && subj.Account != "" {
		rec.UserID = user
	}
	rec.Mode = GrantRefreshToken
	rec.AccessToken = answer.AccessToken
	rec.IssuedAt = issued.UTC()
	rec.ExpiresAt = issued.Add(answer.Lifetime).UTC()
	rec.RejectedAt = time.Time{}
	rec.MismatchTenant, rec.MismatchAt = "", time.Time{}
	rec.clearMark() // the write of the rotated record clears the mark
}

// refreshRefused turns a failed refresh into the subject's failure, and
// marks a refresh token Fortnox rejected so that no process tries it again.
func (g refreshGrant) refreshRefused(ctx context.Context, s *Settings, subj Subject, rec *Record, err error) *Error {
	m := g.m
	failure := AsTokenError(err)
	switch {
	case failure.Failure == FailNoConsent && failure.Code != "invalid_grant":
		// Another 4xx (a proxy's 403, a 413): the token may still be
		// good, so it is not marked dead; the tenant backs off.
		failure.Failure = FailBadAnswer
	case failure.Failure == FailNoConsent: // invalid_grant: the refresh token is dead
		failure.Failure = FailGrantRejected
		rec.RejectedAt = m.clock.Now().UTC()
		span := m.tracer.storeSpan(subj, OpSaveRecord)
		serr := s.Records.save(ctx, subj, rec)
		span.EndErr(serr)
		if serr != nil {
			m.Logger().Error("could not mark the rejected refresh token in storage", append(subj.LogFields(), zap.Error(serr))...)
		}
		m.notes.notifyChainBroken(subj, "refresh_token_rejected")
	}
	return failure
}

// useStored caches and returns the record's access token when it is fresh
// (not the stale one, not one Fortnox refused, and not yet due for
// refresh). A stored token that names another tenant (or user) than its
// record is refused with an error: the record was tampered with.
func (g refreshGrant) useStored(s *Settings, subj Subject, rec *Record, stale *Token) (*Token, *Error) {
	m := g.m
	if rec.AccessToken == "" || rec.IssuedAt.IsZero() || !rec.ExpiresAt.After(rec.IssuedAt) {
		return nil, nil
	}
	bearer := "Bearer " + rec.AccessToken
	if (stale != nil && stale.Bearer == bearer) || m.ledger.wasRejected(subj.Key(), bearer) {
		return nil, nil
	}
	lifetime := rec.ExpiresAt.Sub(rec.IssuedAt)
	n := m.clock.Now()
	if !n.Before(rec.IssuedAt.Add(RefreshAheadAfter(lifetime, s.RefreshBefore))) || !n.Before(rec.ExpiresAt.Add(-skewFor(lifetime))) {
		return nil, nil
	}
	if terr := checkTokenBinding(rec.AccessToken, subj, GrantRefreshToken, rec.UserID); terr != nil {
		terr.detail = "It was read from the record stored for " + subj.String() + ", which is not overwritten."
		return nil, terr
	}
	t := m.CacheToken(subj, GrantRefreshToken, rec.AccessToken, rec.IssuedAt, lifetime, s.RefreshBefore)
	m.ledger.found(subj.Key(), GrantRefreshToken)
	return t, nil
}

// saveUnsaved writes a record whose save failed earlier. Until it is
// written, no refresh may happen: its refresh token is the only live one.
func (g refreshGrant) saveUnsaved(ctx context.Context, s *Settings, subj Subject) error {
	m := g.m
	rec := m.ledger.unsaved(subj.Key())
	if rec == nil {
		return nil
	}
	if err := s.Records.withLock(ctx, subj, func() error { return s.Records.saveHard(ctx, subj, rec) }); err != nil {
		return err
	}
	m.ledger.saved(subj.Key(), rec)
	m.Logger().Warn("the refresh token that could not be saved earlier is saved now", subj.LogFields()...)
	return nil
}

// storageFailure records a storage error as the subject's failure.
func (g refreshGrant) storageFailure(subj Subject, err error) *Error {
	return g.failedWithoutRequest(subj, asStorageError(err))
}

// failedWithoutRequest records a failure found before any token request.
func (g refreshGrant) failedWithoutRequest(subj Subject, terr *Error) *Error {
	m := g.m
	m.RecordFailure(subj, GrantRefreshToken, terr, 0)
	return terr
}

// asStorageError is the token error of a storage failure: a record that
// names another tenant is a tenant mismatch; the rest is the store's fault.
func asStorageError(err error) *Error {
	return classifyFailure(err, FailStorage)
}
