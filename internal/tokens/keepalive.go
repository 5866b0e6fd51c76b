package tokens

import (
	"context"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"go.uber.org/zap"
)

// Fortnox's refresh tokens die after 45 days unused. A tenant (or named
// account) whose refresh token sees no use for that long (a customer on
// client credentials keeps its refresh token only as a fallback; a quiet
// customer sends nothing) would lose it. The manager looks over the stored
// records now and then and refreshes, under the usual lock, those not
// refreshed for keepAliveAfter.
const (
	keepAliveAfter = 30 * 24 * time.Hour
	keepAliveEvery = time.Hour
)

// keeper keeps stored refresh tokens alive: each is refreshed before
// Fortnox would let it expire unused.
type keeper struct{ m *Manager }

// keepAliveLoop runs keepAlive a few minutes after the manager starts,
// then every keepAliveEvery, until the manager is destroyed.
func (kp keeper) keepAliveLoop() {
	m := kp.m
	t := time.NewTimer(5 * time.Minute)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
			m.KeepAlive()
			t.Reset(keepAliveEvery)
		}
	}
}

// refreshTokenAge is how long ago the record's refresh token was issued
// (records of older versions: when its access token was).
func refreshTokenAge(rec *Record, n time.Time) (time.Duration, bool) {
	at := rec.RefreshTokenAt
	if at.IsZero() {
		at = rec.IssuedAt
	}
	if at.IsZero() || !rec.liveRefreshToken() {
		return 0, false
	}
	return n.Sub(at), true
}

// KeepAlive refreshes the stored refresh tokens that are older than
// keepAliveAfter, and updates the age metric. It returns how many it
// refreshed.
func (m *Manager) KeepAlive() int {
	s := m.Settings.Load()
	if s == nil || s.Records == nil {
		return 0
	}
	ctx, cancel := context.WithTimeout(m.ctx, 10*time.Minute)
	defer cancel()
	subjects, err := s.Records.subjects(ctx)
	if err != nil {
		m.Logger().Warn("keep-alive: could not list the stored refresh tokens", zap.Error(err))
		return 0
	}
	n := m.clock.Now()
	var oldest time.Duration
	refreshed := 0
	for _, subj := range subjects {
		rec, err := s.Records.load(ctx, subj)
		if err != nil || rec == nil {
			continue
		}
		age, ok := refreshTokenAge(rec, n)
		if !ok {
			continue
		}
		if age >= keepAliveAfter && m.keeper.keepAliveOne(ctx, s, subj) {
			refreshed++
			continue
		}
		oldest = max(oldest, age)
	}
	m.OldestRefreshToken.Store(int64(oldest / time.Second))
	return refreshed
}

// keepAliveOne refreshes one subject's refresh token under its lock, if
// it is still old when read again (another process may have refreshed it).
// The new access token is stored but not cached: a tenant on client
// credentials keeps using its service account's token.
func (kp keeper) keepAliveOne(ctx context.Context, s *Settings, subj Subject) bool {
	m := kp.m
	var r rotated
	_, _, _ = m.Flights.Do(subj.Key(), func() (any, error) {
		err := s.Records.withLock(ctx, subj, func() error {
			rec, err := s.Records.load(ctx, subj)
			if err != nil || rec == nil {
				return err
			}
			if age, ok := refreshTokenAge(rec, m.clock.Now()); !ok || age < keepAliveAfter {
				return nil
			}
			r = m.refresh.refreshStored(ctx, s, subj, rec)
			return nil
		})
		if err != nil {
			m.Logger().Warn("keep-alive: the refresh token could not be refreshed", append(subj.LogFields(), zap.Error(err))...)
		}
		return nil, nil
	})
	m.refresh.settle(r)
	switch {
	case r.failure != nil:
		m.RecordFailure(subj, GrantRefreshToken, r.failure, r.took)
	case r.answer != nil:
		metricsTokenRequest(GrantRefreshToken, "ok", r.took)
		metrics.KeptAlive.Inc()
		m.Logger().Info("refresh token kept alive: it had not been used for 30 days", subj.LogFields()...)
	}
	return r.answer != nil
}
