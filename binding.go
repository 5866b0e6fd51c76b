package fortnox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	"go.uber.org/zap"
)

// A token serves only the tenant it was issued for. Every access token the
// sidecar obtains (client credentials, refresh, code exchange, or read from
// a store) is checked against its tenantId claim before it is used or
// cached. A refresh that returns another tenant's token has already spent
// the stored refresh token, so the new refresh token Fortnox returned is
// kept: under its own tenant when that tenant has no live one, otherwise in
// a quarantine record that is listed and removable but never used.

// checkTokenBinding checks that an access token is for subj: its tenantId
// claim must name subj's tenant (a token without a readable tenantId is
// accepted only from client credentials, where the TenantId header binds
// it), and for a named account bound to a user, a userId claim must name
// that user.
func checkTokenBinding(accessToken string, subj subject, grant, wantUser string) *tokenError {
	c, err := decodeJWTClaims(accessToken)
	var tenant string
	if err == nil {
		tenant, err = c.tenant()
	}
	switch {
	case err != nil && grant == grantClientCredentials:
		// bound by the TenantId header it was asked with
	case err != nil:
		return &tokenError{failure: failTenantMismatch, tenant: subj.tenant, cause: fmt.Errorf("Fortnox's token names no tenant (%v), so it cannot be proved to be the tenant's", err)}
	case tenant != subj.tenant:
		return &tokenError{failure: failTenantMismatch, tenant: subj.tenant, tokenTenant: tenant}
	}
	if subj.account != "" && wantUser != "" && c != nil {
		if user := c.user(); user != "" && user != wantUser {
			return &tokenError{failure: failUserMismatch, tenant: subj.tenant, account: subj.account, wantUser: wantUser, tokenUser: user}
		}
	}
	return nil
}

// checkTokenTenant is checkTokenBinding for a tenant's service account.
func checkTokenTenant(accessToken, tenant, grant string) *tokenError {
	return checkTokenBinding(accessToken, subject{tenant: tenant}, grant, "")
}

// tokenUserID is the userId claim of an access token, "" if none.
func tokenUserID(accessToken string) string {
	c, err := decodeJWTClaims(accessToken)
	if err != nil {
		return ""
	}
	return c.user()
}

// quarantineRecord keeps a live refresh token that could not be stored
// under its tenant. It is listed (GET /fortnox/quarantine, never with the
// token) and removable, and never used for requests.
type quarantineRecord struct {
	ID       string `json:"id"`
	ClientID string `json:"client_id"`
	// Tenant and UserID are whose token it is, as its access token says
	// ("" when it names none).
	Tenant string `json:"tenant,omitempty"`
	UserID string `json:"user_id,omitempty"`
	// Account is the named account it was meant for ("" for a tenant's
	// service account).
	Account string `json:"account,omitempty"`
	// SubmittedFor is the tenant it was stored or handed over for.
	SubmittedFor string    `json:"submitted_for"`
	Reason       string    `json:"reason"`
	RefreshToken string    `json:"refresh_token,omitempty"`
	AccessToken  string    `json:"access_token,omitempty"`
	IssuedAt     time.Time `json:"issued_at,omitzero"`
	ExpiresAt    time.Time `json:"expires_at,omitzero"`
	CreatedAt    time.Time `json:"created_at"`
}

// quarantineInfo is a quarantine record as the admin API lists it.
type quarantineInfo struct {
	ID           string    `json:"id"`
	Tenant       *string   `json:"tenant"`
	UserID       *string   `json:"user_id"`
	Account      *string   `json:"account"`
	SubmittedFor string    `json:"submitted_for"`
	Reason       string    `json:"reason"`
	CreatedAt    time.Time `json:"created_at"`
}

func quarantineKey(clientID, id string) string {
	return quarantinePrefix(clientID) + id + ".json"
}

func newQuarantineID() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return now().UTC().Format("20060102T150405") + "-" + hex.EncodeToString(b)
}

// validQuarantineID: what newQuarantineID makes.
func validQuarantineID(id string) bool {
	if len(id) < 10 || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c == 'T' || c == '-') {
			return false
		}
	}
	return true
}

// strandedToken is a refresh answer that did not belong where it was asked
// for, already written to quarantine.
type strandedToken struct {
	q          *quarantineRecord
	quarantine bool // written to quarantine (false: kept in memory only)
	userMixup  bool // same tenant, another user: it stays in quarantine
}

// quarantineAnswer keeps a refresh answer that came back for another
// tenant (or user) than subj's in quarantine: one write, so the window
// between Fortnox rotating the token and storing it stays as short as it
// can be. It returns nil when the answer holds no refresh token.
func (m *tokenManager) quarantineAnswer(ctx context.Context, s *managerSettings, subj subject, answer *tokenAnswer, terr *tokenError) *strandedToken {
	if answer.refreshToken == "" {
		return nil
	}
	issued := now()
	q := &quarantineRecord{
		ID:           newQuarantineID(),
		ClientID:     m.clientID,
		Tenant:       terr.tokenTenant,
		UserID:       tokenUserID(answer.accessToken),
		Account:      subj.account,
		SubmittedFor: subj.tenant,
		Reason:       terr.Error(),
		RefreshToken: answer.refreshToken,
		AccessToken:  answer.accessToken,
		IssuedAt:     issued.UTC(),
		ExpiresAt:    issued.Add(answer.lifetime).UTC(),
		CreatedAt:    issued.UTC(),
	}
	if terr.failure == failUserMismatch {
		q.Tenant = subj.tenant
	}
	st := &strandedToken{q: q, userMixup: terr.failure == failUserMismatch, quarantine: true}
	if err := m.writeQuarantine(ctx, s, q); err != nil {
		m.logger().Error("THE NEW REFRESH TOKEN OF ANOTHER TENANT COULD NOT BE SAVED TO QUARANTINE: it is kept in memory and written as soon as storage works; do not restart this process before",
			append(subj.logFields(), zap.String("token_tenant", q.Tenant), zap.Error(err))...)
		st.quarantine = false
		m.keepStranded(q)
	}
	return st
}

// strand handles a refresh of subj's stored refresh token that returned
// another tenant's (or user's) token: the stored token is spent, so the
// answer goes to quarantine first, then subj's record is marked so that
// the operator sees why it has no refresh token. The caller holds subj's
// lock; it then calls adoptStranded without it.
func (m *tokenManager) strand(ctx context.Context, s *managerSettings, subj subject, rec *tokenRecord, answer *tokenAnswer, terr *tokenError) (*strandedToken, *tokenError) {
	st := m.quarantineAnswer(ctx, s, subj, answer, terr)
	rec.RefreshToken, rec.AccessToken = "", ""
	rec.IssuedAt, rec.ExpiresAt = time.Time{}, time.Time{}
	rec.MismatchTenant = cmpOr(terr.tokenTenant, "(none)")
	if terr.failure == failUserMismatch {
		rec.MismatchTenant = subj.tenant + " (user " + terr.tokenUser + ")"
	}
	rec.MismatchAt = now().UTC()
	if err := s.records.save(ctx, subj, rec); err != nil {
		m.logger().Error("could not mark the record whose refresh token belonged to another tenant", append(subj.logFields(), zap.Error(err))...)
	}
	m.logger().Error("a refresh token stored for the tenant belongs to another: its token was not used",
		append(subj.logFields(), zap.String("token_tenant", rec.MismatchTenant), zap.String("error", terr.Error()))...)
	if st == nil {
		terr.detail = "Fortnox returned no new refresh token with it."
	}
	return st, terr
}

// writeQuarantine stores a quarantine record; like saveHard, a write that
// has started is not cut short.
func (m *tokenManager) writeQuarantine(ctx context.Context, s *managerSettings, q *quarantineRecord) error {
	key := quarantineKey(m.clientID, q.ID)
	raw, err := s.records.encode(key, q)
	if err != nil {
		return err
	}
	ctx = context.WithoutCancel(ctx)
	for attempt, pause := 0, 100*time.Millisecond; ; attempt, pause = attempt+1, pause*3 {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err = s.records.storage.Store(wctx, key, raw)
		cancel()
		if err == nil {
			m.notifyQuarantined(q)
		}
		if err == nil || attempt == 3 {
			return err
		}
		time.Sleep(pause)
	}
}

// keepStranded holds a quarantine record that could not be written; the
// sweeper tries again.
func (m *tokenManager) keepStranded(q *quarantineRecord) {
	m.mu.Lock()
	m.stranded = append(m.stranded, q)
	m.mu.Unlock()
}

// saveStranded writes quarantine records kept in memory.
func (m *tokenManager) saveStranded(ctx context.Context) {
	s := m.settings.Load()
	if s == nil || s.records == nil {
		return
	}
	m.mu.Lock()
	pending := m.stranded
	m.stranded = nil
	m.mu.Unlock()
	for _, q := range pending {
		if err := m.writeQuarantine(ctx, s, q); err != nil {
			m.keepStranded(q)
			continue
		}
		m.logger().Warn("a refresh token kept in memory is saved to quarantine now", zap.String("quarantine_id", q.ID))
	}
}

// adoptStranded gives a stranded refresh token to its own tenant when that
// tenant has no live refresh token, and otherwise leaves it in quarantine.
// It says where the token is.
func (m *tokenManager) adoptStranded(s *managerSettings, st *strandedToken) string {
	q := st.q
	where := "kept in quarantine as " + q.ID + " (GET /fortnox/quarantine lists it, DELETE /fortnox/quarantine/" + q.ID + " removes it)"
	if !st.quarantine {
		where = "kept in this process's memory only (storage failed); it is written to quarantine as soon as storage works"
	}
	if st.userMixup || !validTenantID(q.Tenant) {
		return where
	}
	owner := subject{tenant: q.Tenant, account: q.Account}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), lockBudget)
	defer cancel()
	adopted := false
	err := s.records.withLock(ctx, owner, func() error {
		rec, err := s.records.loadOrNew(ctx, owner)
		if err != nil || rec.liveRefreshToken() || (rec.UserID != "" && rec.UserID != q.UserID) {
			return err
		}
		rec.RefreshToken, rec.RefreshTokenAt = q.RefreshToken, q.IssuedAt
		rec.AccessToken, rec.IssuedAt, rec.ExpiresAt = q.AccessToken, q.IssuedAt, q.ExpiresAt
		rec.Mode, rec.RejectedAt = grantRefreshToken, time.Time{}
		rec.MismatchTenant, rec.MismatchAt = "", time.Time{}
		if owner.account != "" && q.UserID != "" {
			rec.UserID = q.UserID
		}
		if err := s.records.saveHard(ctx, owner, rec); err != nil {
			return err
		}
		adopted = true
		return nil
	})
	if err != nil || !adopted {
		if err != nil {
			m.logger().Warn("could not give a stranded refresh token to its own tenant; it stays in quarantine",
				zap.String("token_tenant", q.Tenant), zap.String("quarantine_id", q.ID), zap.Error(err))
		}
		return where + "; " + owner.String() + " already has a live refresh token"
	}
	m.tenantRecovered(owner)
	if st.quarantine {
		_ = s.records.storage.Delete(ctx, quarantineKey(m.clientID, q.ID))
	}
	m.logger().Warn("a refresh token handed over for another tenant was stored under its own tenant, which had none",
		zap.String("tenant", q.Tenant), zap.String("submitted_for", q.SubmittedFor))
	return "stored under " + owner.String() + ", which had no live refresh token"
}

// listQuarantine lists the quarantine records, never a token.
func (m *tokenManager) listQuarantine(ctx context.Context, rs *recordStore) ([]quarantineInfo, error) {
	ids, err := rs.names(ctx, strings.TrimSuffix(quarantinePrefix(m.clientID), "/"), ".json", validQuarantineID)
	if err != nil {
		return nil, err
	}
	out := []quarantineInfo{}
	for _, id := range ids {
		q, err := m.loadQuarantine(ctx, rs, id)
		if err != nil {
			out = append(out, quarantineInfo{ID: id, Reason: err.Error()})
			continue
		}
		out = append(out, quarantineInfo{ID: q.ID, Tenant: optional(q.Tenant), UserID: optional(q.UserID), Account: optional(q.Account),
			SubmittedFor: q.SubmittedFor, Reason: q.Reason, CreatedAt: q.CreatedAt})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (m *tokenManager) loadQuarantine(ctx context.Context, rs *recordStore, id string) (*quarantineRecord, error) {
	key := quarantineKey(m.clientID, id)
	raw, err := rs.storage.Load(ctx, key)
	if err != nil {
		return nil, storageError("loading", key, err)
	}
	plain, err := rs.plain(key, raw)
	if err != nil {
		return nil, err
	}
	var q quarantineRecord
	if err := json.Unmarshal(plain, &q); err != nil || q.ID != id {
		return nil, fmt.Errorf("%w: %s holds no quarantine record", errRecordUnreadable, key)
	}
	return &q, nil
}

func optional(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}
