package fortnox

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"github.com/caddyserver/caddy/v2"
	gocache "github.com/patrickmn/go-cache"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/singleflight"
)

// Defaults for the token manager's settings.
const (
	defaultRefreshBefore = 5 * time.Minute
	defaultTokenTimeout  = 10 * time.Second
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
	backoffCap  = time.Minute
)

// settingsGeneration numbers managerSettings in provisioning order.
var settingsGeneration atomic.Uint64

// adopt installs s as the manager's settings unless newer ones are in.
func (m *tokenManager) adopt(s *managerSettings) {
	for {
		cur := m.settings.Load()
		if cur == s || (cur != nil && cur.gen > s.gen) {
			return
		}
		if m.settings.CompareAndSwap(cur, s) {
			return
		}
	}
}

// managers holds one tokenManager per (token_url, client_id), shared by all
// handlers of all loaded configs, so that cached tokens survive a config
// reload. Keyed by managerKey.
var managers = caddy.NewUsagePool()

func managerKey(tokenURL, clientID string) string {
	return tokenURL + "\x00" + clientID
}

// joinManager takes a hold on the shared token manager of (tokenURL,
// clientID), creating it if needed; the caller releases it with
// leaveManager(key) in its Cleanup.
func joinManager(tokenURL, clientID string) (m *tokenManager, key string, err error) {
	key = managerKey(tokenURL, clientID)
	val, _, err := managers.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newTokenManager(tokenURL, clientID), nil
	})
	if err != nil {
		return nil, "", err
	}
	return val.(*tokenManager), key, nil
}

// leaveManager releases a hold taken by joinManager ("" = none taken).
func leaveManager(key string) error {
	if key == "" {
		return nil
	}
	_, err := managers.Delete(key)
	return err
}

// joinConfiguredManager is joinManager for a module's token_url option:
// resolved, and checked as the fortnox handler checks it (an http:// one
// only on loopback), so that no module sends the client secret or a
// refresh token where the fortnox handler would not.
func joinConfiguredManager(repl *caddy.Replacer, rawTokenURL, clientID string) (*tokenManager, string, error) {
	tokenURL := resolveTokenURL(repl, rawTokenURL)
	if err := checkTokenURL(tokenURL); err != nil {
		return nil, "", err
	}
	return joinManager(tokenURL, clientID)
}

// resolveTokenURL is the configured token URL with placeholders resolved,
// or Fortnox's.
func resolveTokenURL(repl *caddy.Replacer, raw string) string {
	if raw == "" {
		return DefaultTokenURL
	}
	return strings.TrimSpace(repl.ReplaceAll(raw, ""))
}

// credentials are the client's id and secret. The secret is only ever put
// into the Basic auth header of a token request.
type credentials struct {
	clientID     string
	clientSecret string
}

// managerSettings can change with each config load. A handler's settings
// are installed on the shared manager when the handler serves its first
// request (or when the manager is new), never merely because a config was
// provisioned: a config that fails to load must not leave its secret or
// storage behind. Newer configs win (gen).
type managerSettings struct {
	gen           uint64
	cred          credentials
	refreshBefore time.Duration
	tokenTimeout  time.Duration
	// retryClientCredentials: how often a tenant on the refresh-token
	// fallback tries client credentials again.
	retryClientCredentials time.Duration
	// maxTokenRequests: token requests in flight at once (0: the default).
	maxTokenRequests int
	// records is the token store (nil in unit tests).
	records *recordStore
	logger  *zap.Logger
	// notify is where the app hears of state changes (nil: nowhere).
	notify *notifySettings
	// listed holds the TenantIds the config names (`tenant` lines): known
	// tenants, which log lines may name (see namedInLogLocked).
	listed map[string]struct{}
}

// listedTenants is s.listed; nil for nil settings.
func (s *managerSettings) listedTenants() map[string]struct{} {
	if s == nil {
		return nil
	}
	return s.listed
}

// subject is whose token: a tenant's service account (account "", the
// client-credentials token with the tenant's own refresh token as
// fallback), or a named user account of the tenant (its own refresh-token
// chain only).
type subject struct {
	tenant, account string
}

// key is the subject's key in the manager's maps: the TenantId itself for
// the service account (no allocation on the hot path), tenant/account
// otherwise (account names cannot hold a slash).
func (s subject) key() string {
	if s.account == "" {
		return s.tenant
	}
	return s.tenant + "/" + s.account
}

func (s subject) String() string {
	if s.account == "" {
		return "tenant " + s.tenant
	}
	return "account " + s.account + " of tenant " + s.tenant
}

// logFields names the subject in a log line.
func (s subject) logFields() []zap.Field {
	if s.account == "" {
		return []zap.Field{zap.String("tenant", s.tenant)}
	}
	return []zap.Field{zap.String("tenant", s.tenant), zap.String("account", s.account)}
}

// cachedToken is an access token ready to be sent. It is never changed after
// it is cached except for the refresh-ahead bookkeeping, which is atomic.
type cachedToken struct {
	// bearer is the whole Authorization header value, made once.
	bearer string
	grant  string
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
	refreshAt  atomic.Int64
	refreshing atomic.Bool
}

func (t *cachedToken) expiry() time.Time { return time.Unix(0, t.expiresAt) }

// accessToken is the token without its "Bearer " prefix.
func (t *cachedToken) accessToken() string { return strings.TrimPrefix(t.bearer, "Bearer ") }

// usableAt says whether t may still be sent at time n (unix ns).
func (t *cachedToken) usableAt(n int64) bool {
	return n < t.usableUntil
}

// tenantState is what the manager remembers about a subject besides its
// token: the last failure and when to try again.
type tenantState struct {
	mode      string // grantClientCredentials, grantRefreshToken or "" (none yet)
	lastError *tokenError
	failures  int
	retryAt   time.Time
	// ccRetryAt: when a tenant on the refresh-token fallback next tries
	// client credentials (it may have gained a service-account consent).
	ccRetryAt time.Time
	// hasRefreshToken: a refresh token is stored for the subject.
	hasRefreshToken bool
	// unsaved holds a record whose new refresh token could not be written
	// to storage; it is written on the next chance, never dropped.
	unsaved *tokenRecord
	// consentRevoked: the customer revoked the service-account consent
	// (fortnox_webhook); the tenant's service account gets 403 until a new
	// consent or refresh token arrives. revocationRead: the stored mark was
	// read (once per state), so a restart does not forget a revocation.
	consentRevoked bool
	revocationRead bool
	// rejected is the last access token Fortnox answered 401 to: it is
	// never used again, even if a store still holds it.
	rejected string
	// unknown: the subject never had a token; its failure is remembered
	// more cheaply (see rememberUnknown).
	unknown bool
}

// tokenManager gets, caches and refreshes tokens for one (token_url,
// client_id). The hot path (tokenFor with a cached, fresh token) takes no
// lock of its own and allocates nothing.
type tokenManager struct {
	tokenURL string
	clientID string
	client   *tokenClient
	settings atomic.Pointer[managerSettings]

	// cache holds *cachedToken by subject key. Dead tokens are removed by
	// the manager's sweeper (go-cache's own janitor is not used: it would
	// outlive the manager).
	cache   *gocache.Cache
	flights singleflight.Group
	// traces: the span of the request each traced flight runs for.
	traces flightTraces

	mu      sync.Mutex
	tenants map[string]*tenantState
	// stranded holds quarantine records that could not be written yet.
	stranded []*quarantineRecord
	// unknownOrder lists the subject keys of unknown failing subjects,
	// oldest first, so that their number stays bounded.
	unknownOrder []string

	// local is what is shared in one process; cluster, when set, what a
	// cluster of sidecars shares through Redis (see sharedState).
	local   *localShared
	cluster atomic.Pointer[clusterRef]

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
	hits, misses atomic.Int64
	// refusalLog keeps refusals anyone can cause from flooding the log.
	refusalLog *logLimiter
	// oldestRefreshToken: the age in seconds of the oldest stored refresh
	// token at the last keep-alive pass.
	oldestRefreshToken atomic.Int64

	// notes tells the app of state changes (notify).
	notes *notifier
}

func newTokenManager(tokenURL, clientID string) *tokenManager {
	ctx, cancel := context.WithCancel(context.Background())
	m := &tokenManager{
		tokenURL: tokenURL,
		clientID: clientID,
		client:   newTokenClient(tokenURL),
		cache:    gocache.New(gocache.NoExpiration, 0),
		tenants:  make(map[string]*tenantState),
		local:    newLocalShared(),
		ctx:      ctx,
		cancel:   cancel,
	}
	m.refusalLog = newLogLimiter()
	m.notes = newNotifier(m)
	go m.sweep(sweepInterval)
	go m.keepAliveLoop()
	go m.notes.run()
	return m
}

// sweepInterval is how often dead tokens and idle tenants are forgotten.
const sweepInterval = 10 * time.Minute

// forgetErrorsAfter: a failed tenant's last error stays visible (GET
// /fortnox/tenants) this long after its last retry time. A subject that
// never had a token is forgotten sooner (forgetUnknownAfter).
const (
	forgetErrorsAfter  = time.Hour
	forgetUnknownAfter = 5 * time.Minute
	// maxUnknownSubjects bounds how many never-seen subjects' failures are
	// remembered: made-up TenantIds cannot grow the manager's memory.
	maxUnknownSubjects = 10000
)

// sweep reclaims memory until the manager is destroyed.
func (m *tokenManager) sweep(every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
			m.dropDeadTokens()
			m.forgetIdleTenants()
			m.local.forgetIdle(invalidationWindow)
			m.saveStranded(m.ctx)
			m.refusalLog.flush(m.logger())
		}
	}
}

// dropDeadTokens removes expired tokens from the cache.
func (m *tokenManager) dropDeadTokens() {
	n := clk.Now().UnixNano()
	for key, item := range m.cache.Items() {
		if t := item.Object.(*cachedToken); n >= t.expiresAt {
			m.cache.Delete(key)
		}
	}
}

// forgetIdleTenants drops what is remembered about subjects with no cached
// token, unless it still matters: an unsaved refresh token, a revoked
// consent, or a recent error.
func (m *tokenManager) forgetIdleTenants() {
	n := clk.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	for key, st := range m.tenants {
		if _, cached := m.cache.Get(key); cached || st.unsaved != nil || st.consentRevoked {
			continue
		}
		keep := forgetErrorsAfter
		if st.unknown {
			keep = forgetUnknownAfter
		}
		if st.lastError != nil && n.Before(st.retryAt.Add(keep)) {
			continue
		}
		delete(m.tenants, key)
	}
	m.unknownOrder = m.unknownOrder[:0:0]
	for key, st := range m.tenants {
		if st.unknown {
			m.unknownOrder = append(m.unknownOrder, key)
		}
	}
}

// destroyGrace bounds how long a manager being destroyed (a config reload
// or a shutdown) waits for refresh-token requests already sent: their
// answers hold the only live refresh tokens, and are stored first.
const destroyGrace = 35 * time.Second

// Destruct implements caddy.Destructor: the last config using this manager
// is gone.
func (m *tokenManager) Destruct() error {
	m.notes.wait(5 * time.Second) // notifications being written reach the store
	m.mu.Lock()                   // no refresh may begin after this (beginRefresh)
	m.cancel()
	m.mu.Unlock()
	done := make(chan struct{})
	go func() {
		m.refreshes.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(destroyGrace):
		m.logger().Error("a refresh-token request sent to Fortnox had no answer within the shutdown grace period; if Fortnox rotated the refresh token, the customer must authorize again")
	}
	m.cache.Flush()
	return nil
}

// ClientID is the client id whose tokens the manager keeps.
func (m *tokenManager) ClientID() string { return m.clientID }

// Codec is the record store that seals records and shared tokens (a bare
// one until a config is in).
func (m *tokenManager) Codec() *recordStore {
	if s := m.settings.Load(); s != nil && s.records != nil {
		return s.records
	}
	return &recordStore{clientID: m.clientID}
}

// clusterRef holds what cluster mode shares (internal/redisstate), set by
// the glue (pickCluster).
type clusterRef struct{ clusterState }

// clusterState is the Backend of cluster mode with what only it has.
type clusterState interface {
	sharedState
	// dropAnyToken removes the subject's shared token, whichever it is.
	dropAnyToken(ctx context.Context, subj subject) error
	// notes is where notifications are kept.
	notes() notifyStore
}

func (m *tokenManager) logger() *zap.Logger {
	if s := m.settings.Load(); s != nil {
		return s.logger
	}
	return zap.NewNop()
}

// tokenFor returns a token for the subject. ctx bounds only this caller's wait.
func (m *tokenManager) tokenFor(ctx context.Context, subj subject) (*cachedToken, error) {
	if v, ok := m.cache.Get(subj.key()); ok {
		t := v.(*cachedToken)
		n := clk.Now().UnixNano()
		if t.usableAt(n) {
			m.hits.Add(1)
			metrics.CacheHit.Inc()
			if n >= t.refreshAt.Load() && t.refreshing.CompareAndSwap(false, true) {
				link, traced := linkTo(ctx)
				go m.refreshAhead(subj, t, link, traced)
			}
			return t, nil
		}
	}
	m.misses.Add(1)
	metrics.CacheMiss.Inc()
	return m.waitForToken(ctx, subj, nil)
}

// errStillWorking answers a caller whose token request is still running
// after the longest a caller waits (a refresh-token request that was sent
// is never cut short: its answer is stored first).
var errStillWorking = errors.New("the token request for the tenant is still running")

// waitForToken joins (or starts) the single token request for the subject
// and waits for it or for ctx, whichever comes first. stale, when set, is a
// token the caller knows is bad and that must not be returned again: a
// flight that started before the caller knew (and so may hand it back) is
// waited out, and a new one is started.
func (m *tokenManager) waitForToken(ctx context.Context, subj subject, stale *cachedToken) (tok *cachedToken, err error) {
	key := subj.key()
	tctx, span := tokenSpan(ctx, subj)
	defer func() { span.endToken(tok, err) }()
	limit := time.NewTimer(m.callerWaitLimit())
	defer limit.Stop()
	for attempt := 0; ; attempt++ {
		ch := m.flights.DoChan(key, func() (any, error) {
			defer m.traces.begin(key, tctx)()
			return m.obtain(subj, stale)
		})
		m.joined(span, key, tctx)
		select {
		case res := <-ch:
			if res.Err != nil {
				return nil, res.Err
			}
			t := res.Val.(*cachedToken)
			if stale != nil && t.bearer == stale.bearer && attempt < 2 {
				continue // that flight began before the token failed
			}
			return t, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-limit.C:
			return nil, &tokenError{failure: failUnavailable, cause: errStillWorking, retryAt: clk.Now().Add(time.Second)}
		}
	}
}

// callerWaitLimit is the longest a request waits for a token request: the
// storage lock and the token request itself.
func (m *tokenManager) callerWaitLimit() time.Duration {
	s := m.settings.Load()
	if s == nil {
		return lockBudget + defaultTokenTimeout
	}
	return lockBudget + 2*s.tokenTimeout
}

// refreshAhead replaces t in the background before it expires. When the
// request that started it is traced (link), it is traced too, in a root
// span linked to that request's.
func (m *tokenManager) refreshAhead(subj subject, t *cachedToken, link spanLink, traced bool) {
	defer t.refreshing.Store(false)
	var tctx context.Context
	var span tspan
	if traced {
		tctx, span = link.startBackground(subj)
	}
	ch := m.flights.DoChan(subj.key(), func() (any, error) {
		defer m.traces.begin(subj.key(), tctx)()
		return m.obtain(subj, t)
	})
	m.joined(span, subj.key(), tctx)
	res := <-ch
	tok, _ := res.Val.(*cachedToken)
	span.endToken(tok, res.Err)
	if res.Err != nil {
		// Keep using t while it is valid, but do not try again before the
		// tenant's backoff says so.
		var terr *tokenError
		if errors.As(res.Err, &terr) && !terr.retryAt.IsZero() {
			t.refreshAt.Store(terr.retryAt.UnixNano())
		}
	}
}

// drop forgets the subject's cached token if it is still t (nil: whatever
// is cached).
func (m *tokenManager) drop(subj subject, t *cachedToken) {
	key := subj.key()
	if t == nil {
		m.cache.Delete(key)
		return
	}
	if v, ok := m.cache.Get(key); ok && v.(*cachedToken) == t {
		m.cache.Delete(key)
	}
}

// obtain runs once per subject at a time (single flight). It returns a
// fresh cached token if another flight has just stored one, waits out the
// backoff, and otherwise asks Fortnox: for a service account client
// credentials first, the stored refresh token when the tenant has no usable
// service-account consent; for a named account its own refresh token only.
func (m *tokenManager) obtain(subj subject, stale *cachedToken) (*cachedToken, error) {
	n := clk.Now()
	if v, ok := m.cache.Get(subj.key()); ok {
		t := v.(*cachedToken)
		if t != stale && t.usableAt(n.UnixNano()) && n.UnixNano() < t.refreshAt.Load() {
			return t, nil
		}
	}
	s := m.settings.Load()
	if subj.account == "" {
		if err := m.revokedError(s, subj.tenant); err != nil {
			return nil, err
		}
	}
	if err := m.backingOff(subj, n); err != nil {
		return nil, err
	}
	if subj.account != "" {
		t, err := m.viaRefreshToken(s, subj, stale)
		if errors.Is(err, errNoRefreshToken) {
			m.notifyRecordLost(subj)
			terr := &tokenError{failure: failAccountNotAuthorized}
			m.recordFailure(subj, grantRefreshToken, terr, 0)
			return nil, terr
		}
		return t, err
	}
	if m.refreshTokenFirst(subj.tenant, n) {
		t, err := m.viaRefreshToken(s, subj, stale)
		if !errors.Is(err, errNoRefreshToken) {
			return t, err
		}
		// The record is gone (deleted by hand, or moved): start over with
		// client credentials, which answers "no consent" with a backoff.
		m.notifyRecordLost(subj)
		m.forgetMode(subj.tenant)
	}
	return m.viaClientCredentials(s, subj, stale)
}

// viaClientCredentials asks for the tenant's service-account token and
// falls back to its stored refresh token when Fortnox refuses.
func (m *tokenManager) viaClientCredentials(s *managerSettings, subj subject, stale *cachedToken) (*cachedToken, error) {
	// In a cluster another sidecar may have the token already; one asks
	// Fortnox for it, under the subject's lock, and shares it.
	if t := m.sharedFresh(s, subj, stale); t != nil {
		return t, nil
	}
	lctx, lcancel := context.WithTimeout(m.ctx, lockBudget)
	lspan := m.sharedSpan(subj, spanLock, "")
	unlock, lerr := m.shared().lockToken(lctx, subj)
	lspan.endErr(lerr)
	lcancel()
	if lerr == nil {
		defer unlock()
		if t := m.sharedFresh(s, subj, stale); t != nil {
			return t, nil
		}
	}
	rspan := m.childSpan(subj, spanTokenRequest, trace.WithAttributes(attrGrant.String(grantClientCredentials)))
	release, err := m.tokenSlot(s)
	if err != nil {
		rspan.endErr(err)
		return nil, err
	}
	ctx, cancel := context.WithTimeout(m.ctx, s.tokenTimeout)
	start := time.Now()
	answer, err := m.client.clientCredentials(ctx, s.cred, subj.tenant)
	took := time.Since(start)
	cancel()
	release()
	rspan.endAnswer(answer, err)
	if err == nil {
		if terr := checkTokenTenant(answer.accessToken, subj.tenant, grantClientCredentials); terr != nil {
			terr.fromClientCredentials = true
			m.recordFailure(subj, grantClientCredentials, terr, took)
			return nil, terr
		}
		t := m.store(subj, grantClientCredentials, answer, s.refreshBefore)
		m.recordSuccess(subj, grantClientCredentials, t, took)
		m.share(subj, t)
		return t, nil
	}
	terr := asTokenError(err)
	if terr.failure == failNoConsent && s.records != nil {
		t, rerr := m.viaRefreshToken(s, subj, stale)
		if !errors.Is(rerr, errNoRefreshToken) {
			m.noteClientCredentialsRefused(subj.tenant, s)
			metrics.TokenRequests.WithLabelValues(grantClientCredentials, terr.errorCode()).Inc()
			if rerr == nil {
				m.share(subj, t) // the other sidecars need not ask for client credentials
			}
			return t, rerr
		}
		m.notifyRecordLost(subj) // a refresh-token tenant whose record is gone
	}
	m.recordFailure(subj, grantClientCredentials, terr, took)
	return nil, terr
}

// shared is the seam to what the client's sidecars share.
func (m *tokenManager) shared() sharedState {
	if c := m.cluster.Load(); c != nil {
		return c
	}
	return m.local
}

// sharedFresh caches and returns the subject's token as another sidecar
// shared it, when it is fresh (not stale, not refused, not yet due for
// refresh) and the tenant's. Local: there is none.
func (m *tokenManager) sharedFresh(s *managerSettings, subj subject, stale *cachedToken) *cachedToken {
	ctx, cancel := context.WithTimeout(m.ctx, sharedCallLimit)
	span := m.sharedSpan(subj, spanStore, opLoadSharedToken)
	st, err := m.shared().loadToken(ctx, subj)
	span.endErr(err)
	cancel()
	if err != nil || st == nil || !st.ExpiresAt.After(st.IssuedAt) {
		return nil
	}
	bearer := "Bearer " + st.AccessToken
	if (stale != nil && stale.bearer == bearer) || m.wasRejected(subj, bearer) {
		return nil
	}
	lifetime := st.ExpiresAt.Sub(st.IssuedAt)
	n := clk.Now()
	if !n.Before(st.IssuedAt.Add(refreshAheadAfter(lifetime, s.refreshBefore))) || !n.Before(st.ExpiresAt.Add(-skewFor(lifetime))) {
		return nil
	}
	if checkTokenBinding(st.AccessToken, subj, st.Grant, "") != nil {
		return nil
	}
	t := m.cacheToken(subj, st.Grant, st.AccessToken, st.IssuedAt, lifetime, s.refreshBefore)
	m.mu.Lock()
	state := m.state(subj.key())
	state.mode = st.Grant
	state.failures, state.lastError, state.retryAt, state.unknown = 0, nil, time.Time{}, false
	if st.Grant == grantRefreshToken && subj.account == "" {
		// Another sidecar found that the tenant has no service-account
		// consent: do not ask again before retry_client_credentials.
		state.hasRefreshToken = true
		state.ccRetryAt = n.Add(s.retryClientCredentials)
	}
	m.mu.Unlock()
	return t
}

// share gives a new token to the other sidecars (cluster mode).
func (m *tokenManager) share(subj subject, t *cachedToken) {
	ctx, cancel := context.WithTimeout(m.ctx, sharedCallLimit)
	defer cancel()
	span := m.sharedSpan(subj, spanStore, opShareToken)
	span.endErr(m.shared().storeToken(ctx, subj, &sharedToken{AccessToken: t.accessToken(), Grant: t.grant,
		IssuedAt: t.issuedAt.UTC(), ExpiresAt: t.expiry().UTC()}))
}

// tokenSlot waits for one of the client's token-request slots (at most
// max_token_requests in flight, across the cluster in cluster mode), for
// up to token_timeout.
func (m *tokenManager) tokenSlot(s *managerSettings) (release func(), err error) {
	n := s.maxTokenRequests
	if n <= 0 {
		n = defaultMaxTokenRequests
	}
	release, err = m.shared().tokenSlot(m.ctx, n, s.tokenTimeout)
	if err != nil {
		return nil, &tokenError{failure: failUnavailable, cause: err, retryAt: clk.Now().Add(time.Second)}
	}
	return release, nil
}

// store caches a new token for the subject and returns it.
func (m *tokenManager) store(subj subject, grant string, a *tokenAnswer, refreshBefore time.Duration) *cachedToken {
	return m.cacheToken(subj, grant, a.accessToken, clk.Now(), a.lifetime, refreshBefore)
}

// cacheToken caches an access token issued at issued for lifetime.
func (m *tokenManager) cacheToken(subj subject, grant, accessToken string, issued time.Time, lifetime, refreshBefore time.Duration) *cachedToken {
	t := &cachedToken{
		bearer:    "Bearer " + accessToken,
		grant:     grant,
		issuedAt:  issued,
		expiresAt: issued.Add(lifetime).UnixNano(),
	}
	t.usableUntil = t.expiresAt - int64(skewFor(lifetime))
	t.refreshAt.Store(issued.Add(refreshAheadAfter(lifetime, refreshBefore) - refreshSpread(lifetime)).UnixNano())
	// No go-cache expiry: its Get would read the clock a second time on
	// the hot path. Dead tokens are never used (usableAt) and the sweeper
	// removes them.
	m.cache.Set(subj.key(), t, gocache.NoExpiration)
	return t
}

// skewFor is how long before its expiry a token of this lifetime is no
// longer sent.
func skewFor(lifetime time.Duration) time.Duration {
	return min(expirySkew, lifetime/4)
}

// refreshAheadAfter is how long after issue a token is due for a
// background refresh: max(lifetime-refreshBefore, lifetime/2), so that a
// short lifetime is not refreshed on every request.
func refreshAheadAfter(lifetime, refreshBefore time.Duration) time.Duration {
	return max(lifetime-refreshBefore, lifetime/2)
}

// refreshSpread is a random share of up to a tenth of the lifetime by which
// a token's refresh is made earlier, so that tenants warmed together (a
// start, a burst of new customers) do not all refresh in the same second
// an hour later.
func refreshSpread(lifetime time.Duration) time.Duration {
	return time.Duration(rand.Int64N(int64(lifetime/10) + 1))
}

// backingOff returns the subject's last error while its backoff lasts.
func (m *tokenManager) backingOff(subj subject, n time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.tenants[subj.key()]
	if st == nil || st.lastError == nil || !n.Before(st.retryAt) {
		return nil
	}
	return st.lastError
}

// state returns the subject's state, creating it. The caller holds m.mu.
func (m *tokenManager) state(key string) *tenantState {
	st := m.tenants[key]
	if st == nil {
		st = &tenantState{}
		m.tenants[key] = st
	}
	return st
}

// recordFailure remembers a failed token request, sets the subject's next
// attempt (exponential backoff with jitter, or Fortnox's Retry-After if
// longer) and logs it once.
func (m *tokenManager) recordFailure(subj subject, grant string, terr *tokenError, took time.Duration) {
	m.mu.Lock()
	st := m.state(subj.key())
	named := m.namedInLogLocked(subj, st, terr)
	if st.mode == "" && st.failures == 0 && !st.hasRefreshToken && !st.unknown && !st.consentRevoked {
		m.rememberUnknown(subj.key(), st)
	}
	// The same failure again is not news: log it at DEBUG, so that each
	// change of a tenant's state is logged once at its own level.
	repeated := st.lastError != nil && st.lastError.failure == terr.failure && st.lastError.code == terr.code
	st.failures++
	delay := backoffDelay(st.failures)
	retryAt := clk.Now().Add(delay)
	if terr.retryAt.After(retryAt) {
		retryAt = terr.retryAt
	}
	terr.retryAt = retryAt
	st.retryAt = retryAt
	st.lastError = terr
	failures := st.failures
	m.mu.Unlock()
	if took > 0 { // a request was sent (not a known-dead refresh token or a storage error)
		metrics.TokenRequests.WithLabelValues(grant, terr.errorCode()).Inc()
		metrics.TokenDuration.WithLabelValues(grant).Observe(took.Seconds())
	}

	log := m.logger()
	var fields []zap.Field
	if named.tenant != "" {
		fields = named.logFields()
	}
	fields = append(fields,
		zap.String("grant", grant),
		zap.String("outcome", terr.errorCode()),
		zap.Duration("duration", took),
		zap.Int("consecutive_failures", failures),
		zap.Time("retry_at", retryAt),
	)
	errText := terr.Error()
	if named != subj {
		fields = append(fields, zap.String("subject", "not known to the sidecar (GET /fortnox/tenants lists it)"))
		if (named.tenant == "" && strings.Contains(errText, subj.tenant)) || (named.account == "" && subj.account != "" && strings.Contains(errText, subj.account)) {
			errText = "(left out: it names a tenant or account the sidecar does not know, which a client may have made up)"
		}
	}
	fields = append(fields, zap.String("error", errText))
	var other *otherTokenURLError
	if errors.As(terr, &other) {
		fields = append(fields, zap.String("record_token_url", other.recorded), zap.String("token_url", other.configured))
	}
	cause := terr.errorCode() + "\x00" + named.key()
	switch {
	case repeated:
		if ce := log.Check(zapcore.DebugLevel, "token request failed again"); ce != nil {
			ce.Write(fields...)
		}
	case terr.failure == failNoConsent || terr.failure == failAccountNotAuthorized:
		m.refusalLog.write(log, zapcore.WarnLevel, cause, "no token for tenant", fields...)
	case terr.failure == failUnavailable:
		m.refusalLog.write(log, zapcore.WarnLevel, cause, "token request failed", fields...)
	default:
		m.refusalLog.write(log, zapcore.ErrorLevel, cause, "token request failed", fields...)
	}
}

// namedInLogLocked is the part of subj a log line may name: a tenant (or
// account) the sidecar knows, never one a client may have made up (any
// TenantId or account name can be sent). The caller holds m.mu; st is
// subj's state, before this failure is recorded.
func (m *tokenManager) namedInLogLocked(subj subject, st *tenantState, terr *tokenError) subject {
	if terr.foundInRecord() {
		return subj
	}
	known := func(st *tenantState) bool {
		return st != nil && (st.mode != "" || st.hasRefreshToken || st.consentRevoked)
	}
	var named subject
	_, listed := m.settings.Load().listedTenants()[subj.tenant]
	if listed || known(m.tenants[subj.tenant]) {
		named.tenant = subj.tenant
		if subj.account != "" && known(st) {
			named.account = subj.account
		}
	}
	return named
}

// rememberUnknown notes a subject that never had a token and now fails (a
// made-up TenantId, a customer who never connected): such states are
// forgotten sooner, and at most maxUnknownSubjects are kept, the oldest
// going first. The caller holds m.mu.
func (m *tokenManager) rememberUnknown(key string, st *tenantState) {
	st.unknown = true
	m.unknownOrder = append(m.unknownOrder, key)
	for len(m.unknownOrder) > maxUnknownSubjects {
		oldest := m.unknownOrder[0]
		m.unknownOrder = m.unknownOrder[1:]
		if old := m.tenants[oldest]; old != nil && old.unknown && old.unsaved == nil && !old.consentRevoked {
			delete(m.tenants, oldest)
		}
	}
}

func (m *tokenManager) recordSuccess(subj subject, grant string, t *cachedToken, took time.Duration) {
	m.mu.Lock()
	st := m.state(subj.key())
	st.mode = grant
	st.failures = 0
	st.lastError = nil
	st.retryAt = time.Time{}
	st.unknown = false
	m.mu.Unlock()
	metrics.TokenRequests.WithLabelValues(grant, "ok").Inc()
	metrics.TokenDuration.WithLabelValues(grant).Observe(took.Seconds())
	m.logger().Info("token obtained", append(subj.logFields(),
		zap.String("grant", grant),
		zap.String("outcome", "ok"),
		zap.Duration("duration", took),
		zap.Time("expires_at", t.expiry()))...)
}

// backoffDelay is the wait after the n-th consecutive failure.
func backoffDelay(n int) time.Duration {
	d := backoffCap
	if n < 7 {
		d = min(backoffBase<<(n-1), backoffCap)
	}
	jitter := 0.8 + 0.4*rand.Float64()
	return time.Duration(float64(d) * jitter)
}

// asTokenError is the token error of err: err itself when it is one, a
// tenant mismatch for a record that names another tenant, and otherwise
// the token endpoint's failure.
func asTokenError(err error) *tokenError {
	return classifyFailure(err, failUnavailable)
}

// classifyFailure is asTokenError with another failure for the rest.
func classifyFailure(err error, rest tokenFailure) *tokenError {
	var terr *tokenError
	if errors.As(err, &terr) {
		return terr
	}
	if errors.Is(err, errRecordMisplaced) {
		return &tokenError{failure: failRecordMisplaced, cause: err}
	}
	return &tokenError{failure: rest, cause: err}
}
