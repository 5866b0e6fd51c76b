package tokens

import (
	"context"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"go.uber.org/zap"
)

// What a 401 from Fortnox does to a subject's token. Fortnox answers 401
// to a revoked or expired token, but also to a wrong path or a missing
// scope: those would turn every request into a token request (and a
// replay) if each 401 dropped the token. So a 401 drops the token only
// when it cannot be the path's fault as far as the sidecar can tell.
const (
	// sharedCallLimit bounds a call to the shared state (Redis): slow
	// Redis must not hold requests up.
	SharedCallLimit = time.Second
	// freshTokenGrace: a 401 on a token Fortnox minted this recently (its
	// issue time, not when this process read it) is not the token's fault.
	FreshTokenGrace = 10 * time.Second
	// maxInvalidations 401-invalidations per subject per
	// invalidationWindow; past that, 401s pass through and the token stays.
	maxInvalidations   = 3
	invalidationWindow = time.Minute
)

// Unauthorized handles Fortnox's 401 to t (not a replay's). It drops t,
// cached and stored, unless t is fresh or the subject's invalidations are
// used up, and reports whether it did: then the request may be replayed
// with a new token.
func (m *Manager) Unauthorized(subj Subject, t *Token) bool {
	n := m.clock.Now()
	if n.Sub(t.issuedAt) < FreshTokenGrace {
		metrics.InvalidationsBounded.Inc()
		m.invalidate.debug401(subj, "a 401 on a token minted seconds ago: passed through, the token is kept")
		return false
	}
	if m.ledger.wasRejected(subj.Key(), t.Bearer) {
		return true // another request met the same 401 and dropped it
	}
	ctx, cancel := context.WithTimeout(m.ctx, SharedCallLimit)
	allowed, err := m.Shared().AllowInvalidation(ctx, subj, maxInvalidations, invalidationWindow)
	cancel()
	if err == nil && !allowed {
		metrics.InvalidationsBounded.Inc()
		m.invalidate.debug401(subj, "Fortnox keeps answering 401 with new tokens: passed through, the token is kept (a wrong path or a missing scope?)")
		return false
	}
	m.invalidate.reject(subj, t.Bearer)
	m.drop(subj, t)
	go m.invalidate.dropEverywhere(subj, t)
	return true
}

// invalidator drops a token Fortnox answered 401 to, here and in every
// sidecar, at most so often per subject.
type invalidator struct{ m *Manager }

// reject remembers the access token Fortnox refused: it is never used again.
func (iv invalidator) reject(subj Subject, bearer string) {
	m := iv.m
	m.ledger.reject(subj.Key(), bearer)
}

// dropEverywhere removes a refused token from the stores and tells the
// other sidecars.
func (iv invalidator) dropEverywhere(subj Subject, t *Token) {
	m := iv.m
	ctx, cancel := context.WithTimeout(m.ctx, SharedCallLimit)
	_ = m.Shared().DropToken(ctx, subj, t.accessToken())
	cancel()
	if t.grant == GrantRefreshToken {
		iv.dropStoredAccessToken(subj, t.accessToken())
	}
}

func (iv invalidator) debug401(subj Subject, msg string) {
	m := iv.m
	if ce := m.Logger().Check(zap.DebugLevel, msg); ce != nil {
		ce.Write(subj.LogFields()...)
	}
}

// dropStoredAccessToken removes the access token Fortnox refused from the
// subject's record, if the record still holds that one (compare and
// invalidate: a newer token stored meanwhile stays), so that no process
// reads it back. Under the record's lock: the record holds the refresh
// token too.
func (iv invalidator) dropStoredAccessToken(subj Subject, accessToken string) {
	m := iv.m
	s := m.Settings.Load()
	if s == nil || s.Records == nil {
		return
	}
	ctx, cancel := context.WithTimeout(m.ctx, LockBudget)
	defer cancel()
	err := s.Records.withLock(ctx, subj, func() error {
		rec, err := s.Records.load(ctx, subj)
		if err != nil || rec == nil || rec.AccessToken != accessToken {
			return err
		}
		rec.AccessToken, rec.IssuedAt, rec.ExpiresAt = "", time.Time{}, time.Time{}
		return s.Records.save(ctx, subj, rec)
	})
	if err != nil && m.ctx.Err() == nil {
		m.Logger().Warn("could not drop the refused access token from the store; this process will not use it", append(subj.LogFields(), zap.Error(err))...)
	}
}
