package tokens

import (
	"context"
	"errors"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"go.opentelemetry.io/otel/trace"
)

// clientCredentialsGrant is the client-credentials grant, the service
// account's first choice: a token for the tenant from the client id and
// secret, with the tenant's refresh token as fallback when Fortnox refuses.
type clientCredentialsGrant struct{ m *Manager }

// Grant names the grant.
func (clientCredentialsGrant) Grant() Grant { return GrantClientCredentials }

// token asks for the tenant's service-account token and
// falls back to its stored refresh token when Fortnox refuses.
func (g clientCredentialsGrant) token(s *Settings, subj Subject, stale *Token) (*Token, error) {
	m := g.m
	// In a cluster another sidecar may have the token already; one asks
	// Fortnox for it, under the subject's lock, and shares it.
	if t := m.sharing.sharedFresh(s, subj, stale); t != nil {
		return t, nil
	}
	lctx, lcancel := context.WithTimeout(m.ctx, LockBudget)
	lspan := m.tracer.sharedSpan(subj, SpanLock, "")
	unlock, lerr := m.Shared().LockToken(lctx, subj)
	lspan.EndErr(lerr)
	lcancel()
	if lerr == nil {
		defer unlock()
		if t := m.sharing.sharedFresh(s, subj, stale); t != nil {
			return t, nil
		}
	}
	rspan := m.tracer.childSpan(subj, SpanTokenRequest, trace.WithAttributes(AttrGrant.String(string(GrantClientCredentials))))
	release, err := m.sharing.tokenSlot(s)
	if err != nil {
		rspan.EndErr(err)
		return nil, err
	}
	ctx, cancel := context.WithTimeout(m.ctx, s.TokenTimeout)
	start := time.Now()
	answer, err := m.Client.ClientCredentials(ctx, s.Cred, subj.Tenant)
	took := time.Since(start)
	cancel()
	release()
	rspan.endAnswer(answer, err)
	if err == nil {
		if terr := checkTokenTenant(answer.AccessToken, subj.Tenant, GrantClientCredentials); terr != nil {
			terr.FromClientCredentials = true
			m.RecordFailure(subj, GrantClientCredentials, terr, took)
			return nil, terr
		}
		t := m.Store(subj, GrantClientCredentials, answer, s.RefreshBefore)
		m.RecordSuccess(subj, GrantClientCredentials, t, took)
		m.sharing.share(subj, t)
		return t, nil
	}
	terr := AsTokenError(err)
	if terr.Failure == FailNoConsent && s.Records != nil {
		t, rerr := m.refresh.token(s, subj, stale)
		if !errors.Is(rerr, errNoRefreshToken) {
			m.ledger.clientCredentialsRefused(subj.Tenant, m.clock.Now().Add(s.RetryClientCredentials))
			metrics.TokenRequests.WithLabelValues(string(GrantClientCredentials), terr.ErrorCode()).Inc()
			if rerr == nil {
				m.sharing.share(subj, t) // the other sidecars need not ask for client credentials
			}
			return t, rerr
		}
		m.notes.notifyRecordLost(subj) // a refresh-token tenant whose record is gone
	}
	m.RecordFailure(subj, GrantClientCredentials, terr, took)
	return nil, terr
}
