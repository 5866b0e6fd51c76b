package fortnox

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	gocache "github.com/patrickmn/go-cache"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// Defaults for the token manager's settings.
const (
	defaultRefreshBefore = 5 * time.Minute
	defaultTokenTimeout  = 10 * time.Second
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
	// records is the token store in Caddy's storage (nil in unit tests).
	records *recordStore
	logger  *zap.Logger
}

// cachedToken is an access token ready to be sent. It is never changed after
// it is cached except for the refresh-ahead bookkeeping, which is atomic.
type cachedToken struct {
	// bearer is the whole Authorization header value, made once.
	bearer    string
	grant     string
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

// usableAt says whether t may still be sent at time n (unix ns).
func (t *cachedToken) usableAt(n int64) bool {
	return n < t.usableUntil
}

// tenantState is what the manager remembers about a tenant besides its
// token: the last failure and when to try again.
type tenantState struct {
	mode      string // grantClientCredentials, grantRefreshToken or "" (none yet)
	lastError *tokenError
	failures  int
	retryAt   time.Time
	// ccRetryAt: when a tenant on the refresh-token fallback next tries
	// client credentials (it may have gained a service-account consent).
	ccRetryAt time.Time
	// hasRefreshToken: a refresh token is stored for the tenant.
	hasRefreshToken bool
	// unsaved holds a record whose new refresh token could not be written
	// to storage; it is written on the next chance, never dropped.
	unsaved *tokenRecord
	// consentRevoked: a consent-revoked event arrived (fortnox_webhook);
	// the tenant gets 403 until a new consent or refresh token arrives.
	consentRevoked bool
}

// tokenManager gets, caches and refreshes tokens for one (token_url,
// client_id). The hot path (tokenFor with a cached, fresh token) takes no
// lock of its own and allocates nothing.
type tokenManager struct {
	tokenURL string
	clientID string
	client   *tokenClient
	settings atomic.Pointer[managerSettings]

	// cache holds *cachedToken by TenantId. Dead tokens are removed by the
	// manager's sweeper (go-cache's own janitor is not used: it would
	// outlive the manager).
	cache   *gocache.Cache
	flights singleflight.Group

	mu      sync.Mutex
	tenants map[string]*tenantState

	// ctx lives as long as the manager: token requests run under it, not
	// under any one caller's context, so a caller that gives up does not
	// cancel a request other callers wait for.
	ctx    context.Context
	cancel context.CancelFunc

	// Counters for tests and metrics.
	hits, misses atomic.Int64
}

func newTokenManager(tokenURL, clientID string) *tokenManager {
	ctx, cancel := context.WithCancel(context.Background())
	m := &tokenManager{
		tokenURL: tokenURL,
		clientID: clientID,
		client:   newTokenClient(tokenURL),
		cache:    gocache.New(gocache.NoExpiration, 0),
		tenants:  make(map[string]*tenantState),
		ctx:      ctx,
		cancel:   cancel,
	}
	go m.sweep(sweepInterval)
	return m
}

// sweepInterval is how often dead tokens and idle tenants are forgotten.
const sweepInterval = 10 * time.Minute

// forgetErrorsAfter: a failed tenant's last error stays visible (GET
// /fortnox/tenants) this long after its last retry time.
const forgetErrorsAfter = time.Hour

// sweep reclaims memory until the manager is destroyed.
func (m *tokenManager) sweep(every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
			m.cache.DeleteExpired()
			m.forgetIdleTenants()
		}
	}
}

// forgetIdleTenants drops what is remembered about tenants with no cached
// token, unless it still matters: an unsaved refresh token, a revoked
// consent, or a recent error.
func (m *tokenManager) forgetIdleTenants() {
	n := now()
	m.mu.Lock()
	defer m.mu.Unlock()
	for tenant, st := range m.tenants {
		if _, cached := m.cache.Get(tenant); cached || st.unsaved != nil || st.consentRevoked {
			continue
		}
		if st.lastError != nil && n.Before(st.retryAt.Add(forgetErrorsAfter)) {
			continue
		}
		delete(m.tenants, tenant)
	}
}

// Destruct implements caddy.Destructor: the last config using this manager
// is gone.
func (m *tokenManager) Destruct() error {
	m.cancel()
	m.cache.Flush()
	return nil
}

func (m *tokenManager) logger() *zap.Logger {
	if s := m.settings.Load(); s != nil {
		return s.logger
	}
	return zap.NewNop()
}

// tokenFor returns a token for tenant. ctx bounds only this caller's wait.
func (m *tokenManager) tokenFor(ctx context.Context, tenant string) (*cachedToken, error) {
	if v, ok := m.cache.Get(tenant); ok {
		t := v.(*cachedToken)
		n := now().UnixNano()
		if t.usableAt(n) {
			m.hits.Add(1)
			metrics.cacheHit.Inc()
			if n >= t.refreshAt.Load() && t.refreshing.CompareAndSwap(false, true) {
				go m.refreshAhead(tenant, t)
			}
			return t, nil
		}
	}
	m.misses.Add(1)
	metrics.cacheMiss.Inc()
	return m.waitForToken(ctx, tenant, nil)
}

// waitForToken joins (or starts) the single token request for tenant and
// waits for it or for ctx, whichever comes first. stale, when set, is a
// token the caller knows is bad and that must not be returned again.
func (m *tokenManager) waitForToken(ctx context.Context, tenant string, stale *cachedToken) (*cachedToken, error) {
	ch := m.flights.DoChan(tenant, func() (any, error) {
		return m.obtain(tenant, stale)
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*cachedToken), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// refreshAhead replaces t in the background before it expires.
func (m *tokenManager) refreshAhead(tenant string, t *cachedToken) {
	defer t.refreshing.Store(false)
	ch := m.flights.DoChan(tenant, func() (any, error) {
		return m.obtain(tenant, t)
	})
	res := <-ch
	if res.Err != nil {
		// Keep using t while it is valid, but do not try again before the
		// tenant's backoff says so.
		var terr *tokenError
		if errors.As(res.Err, &terr) && !terr.retryAt.IsZero() {
			t.refreshAt.Store(terr.retryAt.UnixNano())
		}
	}
}

// invalidate drops tenant's cached token if it is still t (nil: whatever
// is cached). Used when Fortnox answered 401 to it, or through the admin API.
func (m *tokenManager) invalidate(tenant string, t *cachedToken) {
	if t == nil {
		m.cache.Delete(tenant)
		return
	}
	if v, ok := m.cache.Get(tenant); ok && v.(*cachedToken) == t {
		m.cache.Delete(tenant)
	}
}

// obtain runs once per tenant at a time (single flight). It returns a fresh
// cached token if another flight has just stored one, waits out the tenant's
// backoff, and otherwise asks Fortnox: client credentials first, the stored
// refresh token when the tenant has no usable service-account consent.
func (m *tokenManager) obtain(tenant string, stale *cachedToken) (*cachedToken, error) {
	n := now()
	if v, ok := m.cache.Get(tenant); ok {
		t := v.(*cachedToken)
		if t != stale && t.usableAt(n.UnixNano()) && n.UnixNano() < t.refreshAt.Load() {
			return t, nil
		}
	}
	if err := m.revokedError(tenant); err != nil {
		return nil, err
	}
	if err := m.backingOff(tenant, n); err != nil {
		return nil, err
	}
	s := m.settings.Load()
	if m.refreshTokenFirst(tenant, n) {
		return m.viaRefreshToken(s, tenant, stale)
	}
	ctx, cancel := context.WithTimeout(m.ctx, s.tokenTimeout)
	defer cancel()
	start := time.Now()
	answer, err := m.client.clientCredentials(ctx, s.cred, tenant)
	took := time.Since(start)
	if err == nil {
		t := m.store(tenant, grantClientCredentials, answer, s.refreshBefore)
		m.recordSuccess(tenant, grantClientCredentials, t, took)
		return t, nil
	}
	terr := asTokenError(err)
	if terr.failure == failNoConsent && s.records != nil {
		t, rerr := m.viaRefreshToken(s, tenant, stale)
		if !errors.Is(rerr, errNoRefreshToken) {
			m.noteClientCredentialsRefused(tenant, s)
			metrics.tokenRequests.WithLabelValues(grantClientCredentials, terr.errorCode()).Inc()
			return t, rerr
		}
	}
	m.recordFailure(tenant, grantClientCredentials, terr, took)
	return nil, terr
}

// store caches a new token for tenant and returns it.
func (m *tokenManager) store(tenant, grant string, a *tokenAnswer, refreshBefore time.Duration) *cachedToken {
	return m.cacheToken(tenant, grant, a.accessToken, now(), a.lifetime, refreshBefore)
}

// cacheToken caches an access token issued at issued for lifetime.
func (m *tokenManager) cacheToken(tenant, grant, accessToken string, issued time.Time, lifetime, refreshBefore time.Duration) *cachedToken {
	t := &cachedToken{
		bearer:    "Bearer " + accessToken,
		grant:     grant,
		issuedAt:  issued,
		expiresAt: issued.Add(lifetime).UnixNano(),
	}
	t.usableUntil = t.expiresAt - int64(skewFor(lifetime))
	t.refreshAt.Store(issued.Add(refreshAheadAfter(lifetime, refreshBefore)).UnixNano())
	m.cache.Set(tenant, t, max(time.Until(issued.Add(lifetime)), time.Second))
	return t
}

// skewFor is how long before its expiry a token of this lifetime is no
// longer sent.
func skewFor(lifetime time.Duration) time.Duration {
	return min(expirySkew, lifetime/4)
}

// refreshAheadAfter is how long after issue a token is refreshed in the
// background: max(lifetime-refreshBefore, lifetime/2), so that a short
// lifetime is not refreshed on every request.
func refreshAheadAfter(lifetime, refreshBefore time.Duration) time.Duration {
	return max(lifetime-refreshBefore, lifetime/2)
}

// backingOff returns the tenant's last error while its backoff lasts.
func (m *tokenManager) backingOff(tenant string, n time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.tenants[tenant]
	if st == nil || st.lastError == nil || !n.Before(st.retryAt) {
		return nil
	}
	return st.lastError
}

func (m *tokenManager) state(tenant string) *tenantState {
	st := m.tenants[tenant]
	if st == nil {
		st = &tenantState{}
		m.tenants[tenant] = st
	}
	return st
}

// recordFailure remembers a failed token request, sets the tenant's next
// attempt (exponential backoff with jitter, or Fortnox's Retry-After if
// longer) and logs it once.
func (m *tokenManager) recordFailure(tenant, grant string, terr *tokenError, took time.Duration) {
	m.mu.Lock()
	st := m.state(tenant)
	// The same failure again is not news: log it at DEBUG, so that each
	// change of a tenant's state is logged once at its own level.
	repeated := st.lastError != nil && st.lastError.failure == terr.failure && st.lastError.code == terr.code
	st.failures++
	delay := backoffDelay(st.failures)
	retryAt := now().Add(delay)
	if terr.retryAt.After(retryAt) {
		retryAt = terr.retryAt
	}
	terr.retryAt = retryAt
	st.retryAt = retryAt
	st.lastError = terr
	failures := st.failures
	m.mu.Unlock()
	if took > 0 { // a request was sent (not a known-dead refresh token or a storage error)
		metrics.tokenRequests.WithLabelValues(grant, terr.errorCode()).Inc()
		metrics.tokenDuration.WithLabelValues(grant).Observe(took.Seconds())
	}

	log := m.logger()
	fields := []zap.Field{
		zap.String("tenant", tenant),
		zap.String("grant", grant),
		zap.String("outcome", terr.errorCode()),
		zap.Duration("duration", took),
		zap.Int("consecutive_failures", failures),
		zap.Time("retry_at", retryAt),
		zap.String("error", terr.Error()),
	}
	switch {
	case repeated:
		log.Debug("token request failed again", fields...)
	case terr.failure == failNoConsent:
		log.Warn("no token for tenant", fields...)
	case terr.failure == failUnavailable:
		log.Warn("token request failed", fields...)
	default:
		log.Error("token request failed", fields...)
	}
}

func (m *tokenManager) recordSuccess(tenant, grant string, t *cachedToken, took time.Duration) {
	m.mu.Lock()
	st := m.state(tenant)
	st.mode = grant
	st.failures = 0
	st.lastError = nil
	st.retryAt = time.Time{}
	m.mu.Unlock()
	metrics.tokenRequests.WithLabelValues(grant, "ok").Inc()
	metrics.tokenDuration.WithLabelValues(grant).Observe(took.Seconds())
	m.logger().Info("token obtained",
		zap.String("tenant", tenant),
		zap.String("grant", grant),
		zap.String("outcome", "ok"),
		zap.Duration("duration", took),
		zap.Time("expires_at", t.expiry()))
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

func asTokenError(err error) *tokenError {
	var terr *tokenError
	if errors.As(err, &terr) {
		return terr
	}
	return &tokenError{failure: failUnavailable, cause: err}
}
