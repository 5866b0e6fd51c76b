package tokens

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	gocache "github.com/patrickmn/go-cache"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/singleflight"
)

// Defaults for the token manager's settings.
const (
	DefaultRefreshBefore = 5 * time.Minute
	DefaultTokenTimeout  = 10 * time.Second
	// defaultMaxTokenRequests: token requests of one client id in flight at
	// once; the rest queue. Fortnox's token endpoint may have a limit of its
	// own (unknown), and 200 made-up TenantIds must not become 200
	// simultaneous token requests.
	defaultMaxTokenRequests = 8
	// expirySkew: a token this close to its expiry (a quarter of its
	// lifetime at most) is not sent any more, so a
	// request in flight does not reach Fortnox with a token that just died.
	expirySkew = 10 * time.Second
	// Backoff after a failed token request, per tenant: 1s, 2s, 4s ... 60s,
	// each with ±20% jitter so that many tenants do not retry in step.
	backoffBase = time.Second
	BackoffCap  = time.Minute
)

// SettingsGeneration numbers Settings in provisioning order.
var SettingsGeneration atomic.Uint64

// Adopt installs s as the manager's settings unless newer ones are in.
func (m *Manager) Adopt(s *Settings) {
	for {
		cur := m.Settings.Load()
		if cur == s || (cur != nil && cur.Gen > s.Gen) {
			return
		}
		if m.Settings.CompareAndSwap(cur, s) {
			return
		}
	}
}

// Credentials are the client's id and secret. The secret is only ever put
// into the Basic auth header of a token request.
type Credentials struct {
	ClientID     string
	ClientSecret string
}

// Settings can change with each config load. A handler's settings
// are installed on the shared manager when the handler serves its first
// request (or when the manager is new), never merely because a config was
// provisioned: a config that fails to load must not leave its secret or
// storage behind. Newer configs win (gen).
type Settings struct {
	Gen           uint64
	Cred          Credentials
	RefreshBefore time.Duration
	TokenTimeout  time.Duration
	// retryClientCredentials: how often a tenant on the refresh-token
	// fallback tries client credentials again.
	RetryClientCredentials time.Duration
	// maxTokenRequests: token requests in flight at once (0: the default).
	MaxTokenRequests int
	// records is the token store (nil in unit tests).
	Records *Records
	Logger  *zap.Logger
	// notify is where the app hears of state changes (nil: nowhere).
	Notify *NotifySettings
	// JournalDir is where rotated refresh tokens the store has not taken
	// yet are kept (journal_dir; "": none, unit tests).
	JournalDir string
	// RotationTimeout: a rotation in flight whose holder has not renewed
	// its mark for this long is given up (0: DefaultRotationTimeout).
	RotationTimeout time.Duration
	// listed holds the TenantIds the config names (`tenant` lines): known
	// tenants, which log lines may name (see namedInLogLocked).
	Listed map[string]struct{}
}

// listedTenants is s.listed; nil for nil settings.
func (s *Settings) listedTenants() map[string]struct{} {
	if s == nil {
		return nil
	}
	return s.Listed
}

// Subject is whose token: a tenant's service account (account "", the
// client-credentials token with the tenant's own refresh token as
// fallback), or a named user account of the tenant (its own refresh-token
// chain only).
type Subject struct {
	Tenant, Account string
}

// Key is the subject's key in the manager's maps: the TenantId itself for
// the service account (no allocation on the hot path), tenant/account
// otherwise (account names cannot hold a slash).
func (s Subject) Key() string {
	if s.Account == "" {
		return s.Tenant
	}
	return s.Tenant + "/" + s.Account
}

func (s Subject) String() string {
	if s.Account == "" {
		return "tenant " + s.Tenant
	}
	return "account " + s.Account + " of tenant " + s.Tenant
}

// LogFields names the subject in a log line.
func (s Subject) LogFields() []zap.Field {
	if s.Account == "" {
		return []zap.Field{zap.String("tenant", s.Tenant)}
	}
	return []zap.Field{zap.String("tenant", s.Tenant), zap.String("account", s.Account)}
}

// Token is an access token ready to be sent. It is never changed after
// it is cached except for the refresh-ahead bookkeeping, which is atomic.
type Token struct {
	// bearer is the whole Authorization header value, made once.
	Bearer string
	grant  Grant
	// issuedAt is when Fortnox minted the token (not when this process
	// read it from storage): a 401 on a token minted seconds ago is not the
	// token's fault.
	issuedAt  time.Time
	expiresAt int64 // unix nanoseconds, on the plugin's clock
	// usableUntil is expiresAt less the skew (unix ns).
	usableUntil int64
	// refreshAt is when a background refresh should start (unix ns). It is
	// pushed back after a failed refresh so that requests do not start
	// another one before the tenant's backoff has passed.
	RefreshAt  atomic.Int64
	Refreshing atomic.Bool
	// shared: the token was in the shared store (this process stored it
	// there, or read it from there). One the store no longer holds was
	// dropped by another sidecar (see revalidateToken).
	shared atomic.Bool
	// dropped: the token was dropped from the cache (Dropped).
	dropped atomic.Bool
}

// Dropped reports whether t was dropped from the cache (a 401, another
// sidecar's event, a revalidation): a request that holds it gets the
// current token instead of sending it.
func (t *Token) Dropped() bool { return t.dropped.Load() }

func (t *Token) expiry() time.Time { return time.Unix(0, t.expiresAt) }

// accessToken is the token without its "Bearer " prefix.
func (t *Token) accessToken() string { return strings.TrimPrefix(t.Bearer, "Bearer ") }

// UsableAt says whether t may still be sent at time n (unix ns).
func (t *Token) UsableAt(n int64) bool {
	return n < t.usableUntil
}

// TenantState is what the manager remembers about a subject besides its
// token: the last failure and when to try again.
type TenantState struct {
	Mode      Grant // GrantClientCredentials, grantRefreshToken or "" (none yet)
	LastError *Error
	failures  int
	RetryAt   time.Time
	// ccRetryAt: when a tenant on the refresh-token fallback next tries
	// client credentials (it may have gained a service-account consent).
	ccRetryAt time.Time
	// hasRefreshToken: a refresh token is stored for the subject.
	hasRefreshToken bool
	// unsaved holds a record whose new refresh token could not be written
	// to storage; it is written on the next chance, never dropped.
	Unsaved *Record
	// consentRevoked: the customer revoked the service-account consent
	// (fortnox_webhook); the tenant's service account gets 403 until a new
	// consent or refresh token arrives. revocationRead: the stored mark was
	// read (once per state), so a restart does not forget a revocation.
	ConsentRevoked bool
	revocationRead bool
	// rejected is the last access token Fortnox answered 401 to: it is
	// never used again, even if a store still holds it.
	rejected string
	// unknown: the subject never had a token; its failure is remembered
	// more cheaply (see rememberUnknown).
	Unknown bool
}

// Manager gets, caches and refreshes tokens for one (token_url,
// client_id). The hot path (tokenFor with a cached, fresh token) takes no
// lock of its own and allocates nothing.
type Manager struct {
	// clock is the manager's time: time.Now plus an offset that tests move.
	clock    *clock.Clock
	TokenURL string
	clientID string
	Client   *Client
	Settings atomic.Pointer[Settings]

	// cache holds *Token by subject key. Dead tokens are removed by
	// the manager's sweeper (go-cache's own janitor is not used: it would
	// outlive the manager).
	Cache   *gocache.Cache
	Flights singleflight.Group
	// traces: the span of the request each traced flight runs for.
	traces flightTraces

	// refresh and clientCredentials are the grants.
	refresh           refreshGrant
	clientCredentials clientCredentialsGrant

	// The manager's parts, each for one concern (see their types).
	quarantine  quarantine
	invalidate  invalidator
	keeper      keeper
	consent     consents
	tracer      tracer
	sharing     sharing
	sweeper     sweeper
	revalidator revalidator

	// ledger is what the manager remembers per subject besides its token.
	ledger *Ledger
	// stranded holds quarantine records that could not be written yet.
	stranded stranded
	// lifecycle orders beginRefresh against Destruct: no refresh starts
	// after Destruct cancels.
	lifecycle sync.Mutex

	// local is what is shared in one process; cluster, when set, what a
	// cluster of sidecars shares through Redis (see Backend).
	local   *LocalBackend
	Cluster atomic.Pointer[ClusterRef]

	// refreshes counts refresh-token requests in flight: a manager being
	// destroyed waits for them (bounded), so that no rotated refresh token
	// is lost to a reload or a shutdown.
	refreshes sync.WaitGroup

	// ctx lives as long as the manager: token requests run under it, not
	// under any one caller's context, so a caller that gives up does not
	// cancel a request other callers wait for.
	ctx    context.Context
	cancel context.CancelFunc

	// Counters for tests and metrics.
	hits, Misses atomic.Int64
	// refusalLog keeps refusals anyone can cause from flooding the log.
	RefusalLog *LogLimiter
	// oldestRefreshToken: the age in seconds of the oldest stored refresh
	// token at the last keep-alive pass.
	OldestRefreshToken atomic.Int64

	// notes tells the app of state changes (notify).
	notes *notifier
	// resyncs runs one revalidation pass at a time after reconnects.
	resyncs resyncRuns

	// journal keeps rotated refresh tokens the store has not taken yet;
	// holderID names this manager in the in-flight marks it writes.
	journal  *journal
	holderID string
}

func NewManager(tokenURL, clientID string, clk *clock.Clock) *Manager {
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		TokenURL: tokenURL,
		clientID: clientID,
		clock:    clk,
		Client:   NewTokenClient(tokenURL, clk),
		Cache:    gocache.New(gocache.NoExpiration, 0),
		ledger:   newLedger(),
		local:    NewLocalBackend(clk),
		ctx:      ctx,
		cancel:   cancel,
	}
	m.RefusalLog = NewLogLimiter(clk)
	m.refresh = refreshGrant{m}
	m.clientCredentials = clientCredentialsGrant{m}
	m.notes = newNotifier(m)
	m.quarantine = quarantine{m}
	m.invalidate = invalidator{m}
	m.keeper = keeper{m}
	m.consent = consents{m}
	m.tracer = tracer{m}
	m.sharing = sharing{m}
	m.sweeper = sweeper{m}
	m.revalidator = revalidator{m}
	m.journal = newJournal(m)
	m.holderID = newHolderID()
	go m.sweeper.sweep(sweepInterval)
	go m.journal.loop()
	go m.keeper.keepAliveLoop()
	go m.notes.run()
	return m
}

// sweepInterval is how often dead tokens and idle tenants are forgotten.
const sweepInterval = 10 * time.Minute

// forgetErrorsAfter: a failed tenant's last error stays visible (GET
// /fortnox/tenants) this long after its last retry time. A subject that
// never had a token is forgotten sooner (forgetUnknownAfter).
const (
	ForgetErrorsAfter  = time.Hour
	ForgetUnknownAfter = 5 * time.Minute
	// maxUnknownSubjects bounds how many never-seen subjects' failures are
	// remembered: made-up TenantIds cannot grow the manager's memory.
	MaxUnknownSubjects = 10000
)

// sweeper reclaims memory until the manager is destroyed: dead tokens,
// idle subjects, stranded quarantine records, quiet log causes.
type sweeper struct{ m *Manager }

// sweep reclaims memory until the manager is destroyed.
func (sw sweeper) sweep(every time.Duration) {
	m := sw.m
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
			sw.dropDeadTokens()
			m.ForgetIdleTenants()
			m.local.forgetIdle(invalidationWindow)
			m.quarantine.saveStranded(m.ctx)
			m.RefusalLog.Flush(m.Logger())
		}
	}
}

// dropDeadTokens removes expired tokens from the cache.
func (sw sweeper) dropDeadTokens() {
	m := sw.m
	n := m.clock.Now().UnixNano()
	for key, item := range m.Cache.Items() {
		if t := item.Object.(*Token); n >= t.expiresAt {
			m.Cache.Delete(key)
		}
	}
}

// ForgetIdleTenants drops what is remembered about subjects with no cached
// token, unless it still matters: an unsaved refresh token, a revoked
// consent, or a recent error.
func (m *Manager) ForgetIdleTenants() {
	m.ledger.forgetIdle(m.clock.Now(), func(key string) bool {
		_, cached := m.Cache.Get(key)
		return cached
	})
}

// destroyGrace bounds how long a manager being destroyed (a config reload
// or a shutdown) waits for refresh-token requests already sent: their
// answers hold the only live refresh tokens, and are stored first.
const destroyGrace = 35 * time.Second

// Destruct implements caddy.Destructor: the last config using this manager
// is gone.
func (m *Manager) Destruct() error {
	m.notes.wait(5 * time.Second) // notifications being written reach the store
	m.lifecycle.Lock()            // no refresh may begin after this (beginRefresh)
	m.cancel()
	m.lifecycle.Unlock()
	done := make(chan struct{})
	go func() {
		m.refreshes.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(destroyGrace):
		m.Logger().Error("a refresh-token request sent to Fortnox had no answer within the shutdown grace period; if Fortnox rotated the refresh token, the customer must authorize again")
	}
	m.journal.flushAtShutdown()
	m.Cache.Flush()
	return nil
}

// Ledger is what the manager remembers per subject besides its token (for
// metrics and tests; the manager alone changes it).
func (m *Manager) Ledger() *Ledger { return m.ledger }

// Clock is the manager's clock.
func (m *Manager) Clock() *clock.Clock { return m.clock }

// ClientID is the client id whose tokens the manager keeps.
func (m *Manager) ClientID() string { return m.clientID }

// Codec is the record store that seals records and shared tokens (a bare
// one until a config is in).
func (m *Manager) Codec() *Records {
	if s := m.Settings.Load(); s != nil && s.Records != nil {
		return s.Records
	}
	return &Records{ClientID: m.clientID, Clock: m.clock}
}

// ClusterRef holds what cluster mode shares (internal/redisstate), set by
// the glue (pickCluster).
type ClusterRef struct{ ClusterState }

// ClusterState is the Backend of cluster mode with what only it has.
type ClusterState interface {
	Backend
	// dropAnyToken removes the subject's shared token, whichever it is.
	DropAnyToken(ctx context.Context, subj Subject) error
	// notes is where notifications are kept.
	Notes() NotifyStore
}

func (m *Manager) Logger() *zap.Logger {
	if s := m.Settings.Load(); s != nil {
		return s.Logger
	}
	return zap.NewNop()
}

// TokenFor returns a token for the subject. ctx bounds only this caller's wait.
func (m *Manager) TokenFor(ctx context.Context, subj Subject) (*Token, error) {
	if v, ok := m.Cache.Get(subj.Key()); ok {
		t := v.(*Token)
		n := m.clock.Now().UnixNano()
		if t.UsableAt(n) {
			m.hits.Add(1)
			metrics.CacheHit.Inc()
			if n >= t.RefreshAt.Load() && t.Refreshing.CompareAndSwap(false, true) {
				link, traced := linkTo(ctx)
				go m.refreshAhead(subj, t, link, traced)
			}
			return t, nil
		}
	}
	m.Misses.Add(1)
	metrics.CacheMiss.Inc()
	return m.WaitForToken(ctx, subj, nil)
}

// errStillWorking answers a caller whose token request is still running
// after the longest a caller waits (a refresh-token request that was sent
// is never cut short: its answer is stored first).
var errStillWorking = errors.New("the token request for the tenant is still running")

// WaitForToken joins (or starts) the single token request for the subject
// and waits for it or for ctx, whichever comes first. stale, when set, is a
// token the caller knows is bad and that must not be returned again: a
// flight that started before the caller knew (and so may hand it back) is
// waited out, and a new one is started.
func (m *Manager) WaitForToken(ctx context.Context, subj Subject, stale *Token) (tok *Token, err error) {
	key := subj.Key()
	tctx, span := tokenSpan(ctx, subj)
	defer func() { span.endToken(tok, err) }()
	limit := time.NewTimer(callerWaitLimit(m.Settings.Load()))
	defer limit.Stop()
	for attempt := 0; ; attempt++ {
		ch := m.Flights.DoChan(key, func() (any, error) {
			defer m.traces.begin(key, tctx)()
			return m.obtain(subj, stale)
		})
		m.tracer.joined(span, key, tctx)
		select {
		case res := <-ch:
			if res.Err != nil {
				return nil, res.Err
			}
			t := res.Val.(*Token)
			if stale != nil && t.Bearer == stale.Bearer && attempt < 2 {
				continue // that flight began before the token failed
			}
			return t, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-limit.C:
			return nil, &Error{Failure: FailUnavailable, Cause: errStillWorking, RetryAt: m.clock.Now().Add(time.Second)}
		}
	}
}

// callerWaitLimit is the longest a request waits for a token request: the
// storage lock and the token request itself.
func callerWaitLimit(s *Settings) time.Duration {
	if s == nil {
		return LockBudget + DefaultTokenTimeout
	}
	return LockBudget + 2*s.TokenTimeout
}

// refreshAhead replaces t in the background before it expires. When the
// request that started it is traced (link), it is traced too, in a root
// span linked to that request's.
func (m *Manager) refreshAhead(subj Subject, t *Token, link spanLink, traced bool) {
	defer t.Refreshing.Store(false)
	var tctx context.Context
	var span tspan
	if traced {
		tctx, span = link.startBackground(subj)
	}
	ch := m.Flights.DoChan(subj.Key(), func() (any, error) {
		defer m.traces.begin(subj.Key(), tctx)()
		return m.obtain(subj, t)
	})
	m.tracer.joined(span, subj.Key(), tctx)
	res := <-ch
	tok, _ := res.Val.(*Token)
	span.endToken(tok, res.Err)
	if res.Err != nil {
		// Keep using t while it is valid, but do not try again before the
		// tenant's backoff says so.
		var terr *Error
		if errors.As(res.Err, &terr) && !terr.RetryAt.IsZero() {
			t.RefreshAt.Store(terr.RetryAt.UnixNano())
		}
	}
}

// drop forgets the subject's cached token if it is still t (nil: whatever
// is cached).
func (m *Manager) drop(subj Subject, t *Token) {
	key := subj.Key()
	v, ok := m.Cache.Get(key)
	if !ok || (t != nil && v.(*Token) != t) {
		return
	}
	v.(*Token).dropped.Store(true)
	m.Cache.Delete(key)
}

// obtain runs once per subject at a time (single flight). It returns a
// fresh cached token if another flight has just stored one, waits out the
// backoff, and otherwise asks Fortnox: for a service account client
// credentials first, the stored refresh token when the tenant has no usable
// service-account consent; for a named account its own refresh token only.
func (m *Manager) obtain(subj Subject, stale *Token) (*Token, error) {
	n := m.clock.Now()
	if v, ok := m.Cache.Get(subj.Key()); ok {
		t := v.(*Token)
		if t != stale && t.UsableAt(n.UnixNano()) && n.UnixNano() < t.RefreshAt.Load() {
			return t, nil
		}
	}
	s := m.Settings.Load()
	if subj.Account == "" {
		if err := m.consent.revokedError(s, subj.Tenant); err != nil {
			return nil, err
		}
	}
	if err := m.ledger.backingOff(subj.Key(), n); err != nil {
		return nil, err
	}
	if subj.Account != "" {
		t, err := m.refresh.token(s, subj, stale)
		if errors.Is(err, errNoRefreshToken) {
			m.notes.notifyRecordLost(subj)
			terr := &Error{Failure: FailAccountNotAuthorized}
			m.RecordFailure(subj, GrantRefreshToken, terr, 0)
			return nil, terr
		}
		return t, err
	}
	if m.ledger.refreshTokenFirst(subj.Tenant, n) {
		t, err := m.refresh.token(s, subj, stale)
		if !errors.Is(err, errNoRefreshToken) {
			return t, err
		}
		// The record is gone (deleted by hand, or moved): start over with
		// client credentials, which answers "no consent" with a backoff.
		m.notes.notifyRecordLost(subj)
		m.ledger.forgetMode(subj.Tenant)
	}
	return m.clientCredentials.token(s, subj, stale)
}

// Shared is the seam to what the client's sidecars share.
func (m *Manager) Shared() Backend {
	if c := m.Cluster.Load(); c != nil {
		return c
	}
	return m.local
}

// sharing reads and writes the tokens the sidecars of one client id share
// (Backend), and takes their token-request slots.
type sharing struct{ m *Manager }

// sharedFresh caches and returns the subject's token as another sidecar
// shared it, when it is fresh (not stale, not refused, not yet due for
// refresh) and the tenant's. Local: there is none.
func (sh sharing) sharedFresh(s *Settings, subj Subject, stale *Token) *Token {
	m := sh.m
	ctx, cancel := context.WithTimeout(m.ctx, SharedCallLimit)
	span := m.tracer.sharedSpan(subj, SpanStore, OpLoadSharedToken)
	st, err := m.Shared().LoadToken(ctx, subj)
	span.EndErr(err)
	cancel()
	if err != nil || st == nil || !st.ExpiresAt.After(st.IssuedAt) {
		return nil
	}
	bearer := "Bearer " + st.AccessToken
	if (stale != nil && stale.Bearer == bearer) || m.ledger.wasRejected(subj.Key(), bearer) {
		return nil
	}
	lifetime := st.ExpiresAt.Sub(st.IssuedAt)
	n := m.clock.Now()
	if !n.Before(st.IssuedAt.Add(RefreshAheadAfter(lifetime, s.RefreshBefore))) || !n.Before(st.ExpiresAt.Add(-skewFor(lifetime))) {
		return nil
	}
	if checkTokenBinding(st.AccessToken, subj, st.Grant, "") != nil {
		return nil
	}
	t := m.CacheToken(subj, st.Grant, st.AccessToken, st.IssuedAt, lifetime, s.RefreshBefore)
	t.shared.Store(true)
	m.ledger.sharedFound(subj, st.Grant, n.Add(s.RetryClientCredentials))
	return t
}

// share gives a new token to the other sidecars (cluster mode).
func (sh sharing) share(subj Subject, t *Token) {
	m := sh.m
	ctx, cancel := context.WithTimeout(m.ctx, SharedCallLimit)
	defer cancel()
	span := m.tracer.sharedSpan(subj, SpanStore, OpShareToken)
	err := m.Shared().StoreToken(ctx, subj, &SharedToken{AccessToken: t.accessToken(), Grant: t.grant,
		IssuedAt: t.issuedAt.UTC(), ExpiresAt: t.expiry().UTC()})
	span.EndErr(err)
	if err == nil && m.Cluster.Load() != nil {
		t.shared.Store(true)
	}
}

// tokenSlot waits for one of the client's token-request slots (at most
// max_token_requests in flight, across the cluster in cluster mode), for
// up to token_timeout.
func (sh sharing) tokenSlot(s *Settings) (release func(), err error) {
	m := sh.m
	n := s.MaxTokenRequests
	if n <= 0 {
		n = defaultMaxTokenRequests
	}
	release, err = m.Shared().TokenSlot(m.ctx, n, s.TokenTimeout)
	if err != nil {
		return nil, &Error{Failure: FailUnavailable, Cause: err, RetryAt: m.clock.Now().Add(time.Second)}
	}
	return release, nil
}

// Store caches a new token for the subject and returns it.
func (m *Manager) Store(subj Subject, grant Grant, a *Answer, refreshBefore time.Duration) *Token {
	return m.CacheToken(subj, grant, a.AccessToken, m.clock.Now(), a.Lifetime, refreshBefore)
}

// CacheToken caches an access token issued at issued for lifetime.
func (m *Manager) CacheToken(subj Subject, grant Grant, accessToken string, issued time.Time, lifetime, refreshBefore time.Duration) *Token {
	t := &Token{
		Bearer:    "Bearer " + accessToken,
		grant:     grant,
		issuedAt:  issued,
		expiresAt: issued.Add(lifetime).UnixNano(),
	}
	t.usableUntil = t.expiresAt - int64(skewFor(lifetime))
	t.RefreshAt.Store(issued.Add(RefreshAheadAfter(lifetime, refreshBefore) - refreshSpread(lifetime)).UnixNano())
	// No go-cache expiry: its Get would read the clock a second time on
	// the hot path. Dead tokens are never used (usableAt) and the sweeper
	// removes them.
	m.Cache.Set(subj.Key(), t, gocache.NoExpiration)
	return t
}

// skewFor is how long before its expiry a token of this lifetime is no
// longer sent.
func skewFor(lifetime time.Duration) time.Duration {
	return min(expirySkew, lifetime/4)
}

// RefreshAheadAfter is how long after issue a token is due for a
// background refresh: max(lifetime-refreshBefore, lifetime/2), so that a
// short lifetime is not refreshed on every request.
func RefreshAheadAfter(lifetime, refreshBefore time.Duration) time.Duration {
	return max(lifetime-refreshBefore, lifetime/2)
}

// refreshSpread is a random share of up to a tenth of the lifetime by which
// a token's refresh is made earlier, so that tenants warmed together (a
// start, a burst of new customers) do not all refresh in the same second
// an hour later.
func refreshSpread(lifetime time.Duration) time.Duration {
	return time.Duration(rand.Int64N(int64(lifetime/10) + 1))
}

// RecordFailure remembers a failed token request, sets the subject's next
// attempt (exponential backoff with jitter, or Fortnox's Retry-After if
// longer) and logs it once.
func (m *Manager) RecordFailure(subj Subject, grant Grant, terr *Error, took time.Duration) {
	f := m.ledger.failed(subj, terr, m.clock.Now(), m.Settings.Load().listedTenants())
	named, repeated, failures, retryAt := f.named, f.repeated, f.failures, f.retryAt
	if took > 0 { // a request was sent (not a known-dead refresh token or a storage error)
		metrics.TokenRequests.WithLabelValues(string(grant), terr.ErrorCode()).Inc()
		metrics.TokenDuration.WithLabelValues(string(grant)).Observe(took.Seconds())
	}

	log := m.Logger()
	var fields []zap.Field
	if named.Tenant != "" {
		fields = named.LogFields()
	}
	fields = append(fields,
		zap.String("grant", string(grant)),
		zap.String("outcome", terr.ErrorCode()),
		zap.Duration("duration", took),
		zap.Int("consecutive_failures", failures),
		zap.Time("retry_at", retryAt),
	)
	errText := terr.Error()
	if named != subj {
		fields = append(fields, zap.String("subject", "not known to the sidecar (GET /fortnox/tenants lists it)"))
		if (named.Tenant == "" && strings.Contains(errText, subj.Tenant)) || (named.Account == "" && subj.Account != "" && strings.Contains(errText, subj.Account)) {
			errText = "(left out: it names a tenant or account the sidecar does not know, which a client may have made up)"
		}
	}
	fields = append(fields, zap.String("error", errText))
	var other *otherTokenURLError
	if errors.As(terr, &other) {
		fields = append(fields, zap.String("record_token_url", other.recorded), zap.String("token_url", other.configured))
	}
	cause := terr.ErrorCode() + "\x00" + named.Key()
	switch {
	case repeated:
		if ce := log.Check(zapcore.DebugLevel, "token request failed again"); ce != nil {
			ce.Write(fields...)
		}
	case terr.Failure == FailNoConsent || terr.Failure == FailAccountNotAuthorized:
		m.RefusalLog.Write(log, zapcore.WarnLevel, cause, "no token for tenant", fields...)
	case terr.Failure == FailUnavailable:
		m.RefusalLog.Write(log, zapcore.WarnLevel, cause, "token request failed", fields...)
	default:
		m.RefusalLog.Write(log, zapcore.ErrorLevel, cause, "token request failed", fields...)
	}
}

func (m *Manager) RecordSuccess(subj Subject, grant Grant, t *Token, took time.Duration) {
	m.ledger.succeeded(subj.Key(), grant)
	metrics.TokenRequests.WithLabelValues(string(grant), "ok").Inc()
	metrics.TokenDuration.WithLabelValues(string(grant)).Observe(took.Seconds())
	m.Logger().Info("token obtained", append(subj.LogFields(),
		zap.String("grant", string(grant)),
		zap.String("outcome", "ok"),
		zap.Duration("duration", took),
		zap.Time("expires_at", t.expiry()))...)
}

// BackoffDelay is the wait after the n-th consecutive failure.
func BackoffDelay(n int) time.Duration {
	d := BackoffCap
	if n < 7 {
		d = min(backoffBase<<(n-1), BackoffCap)
	}
	jitter := 0.8 + 0.4*rand.Float64()
	return time.Duration(float64(d) * jitter)
}

// AsTokenError is the token error of err: err itself when it is one, a
// tenant mismatch for a record that names another tenant, and otherwise
// the token endpoint's failure.
func AsTokenError(err error) *Error {
	return classifyFailure(err, FailUnavailable)
}

// classifyFailure is asTokenError with another failure for the rest.
func classifyFailure(err error, rest TokenFailure) *Error {
	var terr *Error
	if errors.As(err, &terr) {
		return terr
	}
	if errors.Is(err, errRecordMisplaced) {
		return &Error{Failure: FailRecordMisplaced, Cause: err}
	}
	return &Error{Failure: rest, Cause: err}
}
