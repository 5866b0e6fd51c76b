package tokens

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// A token serves only the tenant it was issued for. Every access token the
// sidecar obtains (client credentials, refresh, code exchange, or read from
// a store) is checked against its tenantId claim before it is used or
// cached. A refresh or hand-over that returns another tenant's token has
// already spent the refresh token, so the new refresh token Fortnox
// returned is kept in a quarantine record: stored (in Redis in cluster
// mode), listed, served under no name, until an operator releases it to
// its own tenant or deletes it. It is never adopted by a tenant on its own:
// a name chosen for one company must not become live for another.

// checkTokenBinding checks that an access token is for subj: its tenantId
// claim must name subj's tenant (a token without a readable tenantId is
// accepted only from client credentials, where the TenantId header binds
// it), and for a named account bound to a user, a userId claim must name
// that user.
func checkTokenBinding(accessToken string, subj Subject, grant Grant, wantUser string) *Error {
	c, err := DecodeJWTClaims(accessToken)
	var tenant string
	if err == nil {
		tenant, err = c.Tenant()
	}
	switch {
	case err != nil && grant == GrantClientCredentials:
		// bound by the TenantId header it was asked with
	case err != nil:
		return &Error{Failure: FailTenantMismatch, Tenant: subj.Tenant, Cause: fmt.Errorf("Fortnox's token names no tenant (%v), so it cannot be proved to be the tenant's", err)}
	case tenant != subj.Tenant:
		return &Error{Failure: FailTenantMismatch, Tenant: subj.Tenant, TokenTenant: tenant}
	}
	if subj.Account != "" && wantUser != "" && c != nil {
		if user := c.user(); user != "" && user != wantUser {
			return &Error{Failure: FailUserMismatch, Tenant: subj.Tenant, Account: subj.Account, WantUser: wantUser, TokenUser: user}
		}
	}
	return nil
}

// checkTokenTenant is checkTokenBinding for a tenant's service account.
func checkTokenTenant(accessToken, tenant string, grant Grant) *Error {
	return checkTokenBinding(accessToken, Subject{Tenant: tenant}, grant, "")
}

// tokenUserID is the userId claim of an access token, "" if none.
func tokenUserID(accessToken string) string {
	c, err := DecodeJWTClaims(accessToken)
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

// QuarantineInfo is a quarantine record as the admin API lists it.
type QuarantineInfo struct {
	ID           string    `json:"id"`
	Tenant       *string   `json:"tenant"`
	UserID       *string   `json:"user_id"`
	Account      *string   `json:"account"`
	SubmittedFor string    `json:"submitted_for"`
	Reason       string    `json:"reason"`
	CreatedAt    time.Time `json:"created_at"`
}

func QuarantineKey(clientID, id string) string {
	return quarantinePrefix(clientID) + id + ".json"
}

func newQuarantineID(at time.Time) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return at.UTC().Format("20060102T150405") + "-" + hex.EncodeToString(b)
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
}

// quarantine keeps refresh tokens that came back for another tenant or
// user: written to the quarantine records, or held (stranded) until they
// can be.
type quarantine struct{ m *Manager }

// quarantineAnswer keeps a refresh answer that came back for another
// tenant (or user) than subj's in quarantine: one write, so the window
// between Fortnox rotating the token and storing it stays as short as it
// can be. It returns nil when the answer holds no refresh token.
func (qu quarantine) quarantineAnswer(ctx context.Context, s *Settings, subj Subject, answer *Answer, terr *Error) *strandedToken {
	m := qu.m
	if answer.RefreshToken == "" {
		return nil
	}
	issued := m.clock.Now()
	q := &quarantineRecord{
		ID:           newQuarantineID(issued),
		ClientID:     m.clientID,
		Tenant:       terr.TokenTenant,
		UserID:       tokenUserID(answer.AccessToken),
		Account:      subj.Account,
		SubmittedFor: subj.Tenant,
		Reason:       terr.Error(),
		RefreshToken: answer.RefreshToken,
		AccessToken:  answer.AccessToken,
		IssuedAt:     issued.UTC(),
		ExpiresAt:    issued.Add(answer.Lifetime).UTC(),
		CreatedAt:    issued.UTC(),
	}
	if tenant, err := TenantFromToken(answer.AccessToken); err == nil {
		q.Tenant = tenant // whose it is, whatever the failure was
	}
	st := &strandedToken{q: q, quarantine: true}
	if err := qu.writeQuarantine(ctx, s, q); err != nil {
		m.Logger().Error("THE NEW REFRESH TOKEN OF ANOTHER TENANT COULD NOT BE SAVED TO QUARANTINE: it is kept in memory and written as soon as storage works; do not restart this process before",
			append(subj.LogFields(), zap.String("token_tenant", q.Tenant), zap.Error(err))...)
		st.quarantine = false
		m.stranded.keep(q)
	}
	return st
}

// strand handles a refresh of subj's stored refresh token that returned
// another tenant's (or user's) token: the stored token is spent, so the
// answer goes to quarantine first, then subj's record is marked so that
// the operator sees why it has no refresh token. The caller holds subj's
// lock.
func (qu quarantine) strand(ctx context.Context, s *Settings, subj Subject, rec *Record, answer *Answer, terr *Error) (*strandedToken, *Error) {
	m := qu.m
	st := qu.quarantineAnswer(ctx, s, subj, answer, terr)
	rec.RefreshToken, rec.AccessToken = "", ""
	rec.IssuedAt, rec.ExpiresAt = time.Time{}, time.Time{}
	rec.MismatchTenant = CmpOr(terr.TokenTenant, "(none)")
	if terr.Failure == FailUserMismatch {
		rec.MismatchTenant = subj.Tenant + " (user " + terr.TokenUser + ")"
	}
	rec.MismatchAt = m.clock.Now().UTC()
	if err := s.Records.save(ctx, subj, rec); err != nil {
		m.Logger().Error("could not mark the record whose refresh token belonged to another tenant", append(subj.LogFields(), zap.Error(err))...)
	}
	m.Logger().Error("a refresh token stored for the tenant belongs to another: its token was not used",
		append(subj.LogFields(), zap.String("token_tenant", rec.MismatchTenant), zap.String("error", terr.Error()))...)
	if st == nil {
		terr.detail = "Fortnox returned no new refresh token with it."
	}
	return st, terr
}

// writeQuarantine stores a quarantine record; like saveHard, a write that
// has started is not cut short.
func (qu quarantine) writeQuarantine(ctx context.Context, s *Settings, q *quarantineRecord) error {
	m := qu.m
	key := QuarantineKey(m.clientID, q.ID)
	raw, err := s.Records.Encode(key, q)
	if err != nil {
		return err
	}
	ctx = context.WithoutCancel(ctx)
	for attempt, pause := 0, 100*time.Millisecond; ; attempt, pause = attempt+1, pause*3 {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err = s.Records.Storage.Store(wctx, key, raw)
		cancel()
		if err == nil {
			m.notes.notifyQuarantined(q)
		}
		if err == nil || attempt == 3 {
			return err
		}
		time.Sleep(pause)
	}
}

// stranded holds quarantine records that could not be written yet, under
// its own lock; the sweeper tries again (saveStranded).
type stranded struct {
	mu      sync.Mutex
	records []*quarantineRecord
}

// keep holds a record that could not be written.
func (q *stranded) keep(r *quarantineRecord) {
	q.mu.Lock()
	q.records = append(q.records, r)
	q.mu.Unlock()
}

// take hands every held record over to the caller.
func (q *stranded) take() []*quarantineRecord {
	q.mu.Lock()
	defer q.mu.Unlock()
	held := q.records
	q.records = nil
	return held
}

// saveStranded writes quarantine records kept in memory.
func (qu quarantine) saveStranded(ctx context.Context) {
	m := qu.m
	s := m.Settings.Load()
	if s == nil || s.Records == nil {
		return
	}
	pending := m.stranded.take()
	for _, q := range pending {
		if err := qu.writeQuarantine(ctx, s, q); err != nil {
			m.stranded.keep(q)
			continue
		}
		m.Logger().Warn("a refresh token kept in memory is saved to quarantine now", zap.String("quarantine_id", q.ID))
	}
}

// quarantinedWhere says where a stranded refresh token is, for the
// answer and the log: in the quarantine, served under no name, until an
// operator releases or deletes it.
func quarantinedWhere(st *strandedToken) string {
	if !st.quarantine {
		return "kept in this process's memory only (storage failed); it is written to the quarantine as soon as storage works, and served under no name"
	}
	return "kept in the quarantine as " + st.q.ID + ", served under no name until an operator releases it to its own tenant (POST /fortnox/quarantine/" +
		st.q.ID + "/release on the admin endpoint) or deletes it"
}

// ReleaseQuarantine serves a quarantined refresh token under its own
// tenant (the one its access token names) and the account it was handed
// over as, with the rules of a hand-over: never over a live refresh token,
// never under an account bound to another user. The quarantine record is
// deleted once the token is stored. It returns where the token went.
func (o Ops) ReleaseQuarantine(ctx context.Context, id string) (Subject, error) {
	m := o.m
	rs, err := o.Records()
	if err != nil {
		return Subject{}, err
	}
	s := m.Settings.Load()
	if !validQuarantineID(id) {
		return Subject{}, opErrorf(OpInvalid, "invalid_id", "%q is not a quarantine id (see GET /fortnox/quarantine)", id)
	}
	q, err := o.loadQuarantine(ctx, rs, id)
	if errors.Is(err, fs.ErrNotExist) {
		return Subject{}, opErrorf(OpNotFound, "unknown_id", "no quarantine record %s", id)
	}
	if err != nil {
		return Subject{}, adminStoreError("reading the quarantine record", err)
	}
	if !ValidTenantID(q.Tenant) {
		return Subject{}, opErrorf(OpConflict, "tenant_unknown", "quarantine record %s holds a token that names no tenant, so it cannot be served under one; nothing was changed (delete it with DELETE /fortnox/quarantine/%s, and have the customer authorize again)", id, id)
	}
	owner := Subject{Tenant: q.Tenant, Account: q.Account}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), LockBudget+time.Minute)
	defer cancel()
	var refusal error
	err = rs.withLock(ctx, owner, func() error {
		// Read again under the lock: another release may have taken it.
		q, err = o.loadQuarantine(ctx, rs, id)
		if errors.Is(err, fs.ErrNotExist) {
			refusal = opErrorf(OpNotFound, "unknown_id", "no quarantine record %s (it was released or deleted just now)", id)
			return nil
		}
		if err != nil {
			return err
		}
		rec, err := rs.loadOrNew(ctx, owner)
		if err != nil {
			return err
		}
		if rec.liveRefreshToken() {
			remedy := "drop the quarantined one (DELETE /fortnox/quarantine/" + id + ")"
			if owner.Account != "" {
				remedy += ", or delete the account (DELETE /fortnox/tenants/" + owner.Tenant + "/accounts/" + owner.Account + ") and release it again"
			}
			refusal = opErrorf(OpConflict, "live_refresh_token", "%s already has a live refresh token: it is not overwritten, and quarantine record %s is kept as it was. Keep one of the two: %s", owner, id, remedy)
			return nil
		}
		if terr := checkTokenBinding(q.AccessToken, owner, GrantRefreshToken, rec.UserID); terr != nil && q.AccessToken != "" {
			code := terr.ErrorCode()
			refusal = opErrorf(OpConflict, code, "quarantine record %s cannot be served under %s: %s. It is kept as it was; delete the account first (DELETE /fortnox/tenants/%s/accounts/%s) to connect another user under its name", id, owner, terr.Error(), owner.Tenant, owner.Account)
			return nil
		}
		rec.RefreshToken, rec.RefreshTokenAt = q.RefreshToken, q.IssuedAt
		rec.AccessToken, rec.IssuedAt, rec.ExpiresAt = q.AccessToken, q.IssuedAt, q.ExpiresAt
		rec.Mode, rec.RejectedAt = GrantRefreshToken, time.Time{}
		rec.MismatchTenant, rec.MismatchAt = "", time.Time{}
		if owner.Account == "" {
			rec.ConsentRevokedAt = time.Time{}
		} else if q.UserID != "" {
			rec.UserID = q.UserID
		}
		if err := rs.saveHard(ctx, owner, rec); err != nil {
			return err
		}
		// Stored under its owner: the quarantine copy goes, so the token
		// is in one place only.
		if err := rs.Storage.Delete(ctx, QuarantineKey(m.clientID, id)); err != nil {
			m.Logger().Warn("a released refresh token is stored under its tenant, but its quarantine record could not be deleted: delete it",
				append(owner.LogFields(), zap.String("quarantine_id", id), zap.Error(err))...)
		}
		return nil
	})
	if err != nil {
		return Subject{}, adminStoreError("releasing the quarantine record", err)
	}
	if refusal != nil {
		return Subject{}, refusal
	}
	m.drop(owner, nil)
	o.tenantRecovered(owner)
	// As a hand-over: a named account uses the access token at once; a
	// service account still tries client credentials first.
	if owner.Account != "" && s != nil && q.AccessToken != "" && q.ExpiresAt.After(m.clock.Now()) {
		m.CacheToken(owner, GrantRefreshToken, q.AccessToken, q.IssuedAt, q.ExpiresAt.Sub(q.IssuedAt), s.RefreshBefore)
	}
	m.Logger().Warn("a quarantined refresh token was released to its own tenant through the admin API",
		append(owner.LogFields(), zap.String("quarantine_id", id), zap.String("handed_over_for", q.SubmittedFor))...)
	return owner, nil
}

// ListQuarantine lists the quarantine records, never a token.
func (o Ops) ListQuarantine(ctx context.Context, rs *Records) ([]QuarantineInfo, error) {
	m := o.m
	ids, err := rs.names(ctx, strings.TrimSuffix(quarantinePrefix(m.clientID), "/"), ".json", validQuarantineID)
	if err != nil {
		return nil, err
	}
	out := []QuarantineInfo{}
	for _, id := range ids {
		q, err := o.loadQuarantine(ctx, rs, id)
		if errors.Is(err, fs.ErrNotExist) {
			continue // released or deleted since it was listed, or a tombstone
		}
		if err != nil {
			out = append(out, QuarantineInfo{ID: id, Reason: err.Error()})
			continue
		}
		out = append(out, QuarantineInfo{ID: q.ID, Tenant: optional(q.Tenant), UserID: optional(q.UserID), Account: optional(q.Account),
			SubmittedFor: q.SubmittedFor, Reason: q.Reason, CreatedAt: q.CreatedAt})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (o Ops) loadQuarantine(ctx context.Context, rs *Records, id string) (*quarantineRecord, error) {
	m := o.m
	key := QuarantineKey(m.clientID, id)
	raw, err := rs.Storage.Load(ctx, key)
	if err != nil {
		return nil, storageError("loading", key, err)
	}
	plain, err := rs.Plain(key, raw)
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
