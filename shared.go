package fortnox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"sync"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
)

// What the sidecars of one (token URL, client id) share. Fortnox's rate
// limit, its consents and its single-use refresh tokens belong to (client
// id, tenant), not to one process, so with several sidecars (one beside
// each app pod) they must be shared. sharedState is the seam: localShared
// keeps them in this process (no `redis` line: one sidecar, exactly as
// before), redisShared keeps them in Redis for a cluster of sidecars.
// Nothing above the seam knows which it talks to. Token records are shared
// the same way one level down: recordStore's backend is Caddy's storage or
// Redis. The rate budget is the handler's ratelimit.Waiter (internal/ratelimit).
type sharedState interface {
	// loadToken returns the subject's access token as another sidecar
	// stored it (nil: none). Local: always nil, the memory cache is all.
	loadToken(ctx context.Context, subj subject) (*sharedToken, error)
	// storeToken shares an access token with the other sidecars.
	storeToken(ctx context.Context, subj subject, t *sharedToken) error
	// dropToken removes the subject's shared access token if it is still
	// accessToken (compare and invalidate), and tells every sidecar.
	dropToken(ctx context.Context, subj subject, accessToken string) error
	// lockToken serializes token requests for the subject across sidecars
	// (local: nothing to do, the single flight is enough).
	lockToken(ctx context.Context, subj subject) (unlock func(), err error)

	// publish tells the other sidecars about an event this one has
	// already applied to itself.
	publish(ctx context.Context, ev event) error

	// firstUse reports whether name (a connect state) is used for the
	// first time; it is remembered for ttl.
	firstUse(ctx context.Context, name string, ttl time.Duration) (bool, error)
	// keepResult remembers how a connect flow ended (a signed result,
	// never a token) for ttl; flowResult reads it back ("" if none).
	keepResult(ctx context.Context, name, result string, ttl time.Duration) error
	flowResult(ctx context.Context, name string) (string, error)
	// newerEvent reports whether a consent event for tenant stamped at is
	// newer than every one applied before, and remembers it if so.
	newerEvent(ctx context.Context, tenant string, at time.Time) (bool, error)
	// allowInvalidation reports whether a 401 may drop the subject's token:
	// at most max per window.
	allowInvalidation(ctx context.Context, subj subject, max int, window time.Duration) (bool, error)
	// tokenSlot waits up to wait for one of max token-request slots of the
	// client id.
	tokenSlot(ctx context.Context, max int, wait time.Duration) (release func(), err error)
}

// sharedToken is an access token as it is shared between sidecars.
type sharedToken struct {
	AccessToken string    `json:"access_token"`
	Grant       string    `json:"grant"`
	IssuedAt    time.Time `json:"issued_at"`
	ExpiresAt   time.Time `json:"expires_at"`
}

// event is what one sidecar tells the others.
type event struct {
	Kind    string `json:"kind"`
	Tenant  string `json:"tenant"`
	Account string `json:"account,omitempty"`
	// TokenHash names the access token an invalidation is about (never
	// the token itself).
	TokenHash string    `json:"token_hash,omitempty"`
	At        time.Time `json:"at"`
	// Origin is the sidecar that sent it: it does not apply its own.
	Origin string `json:"origin"`
}

// Event kinds.
const (
	eventRevoked    = "consent_revoked" // the service-account consent was revoked
	eventCreated    = "consent_created" // a consent was created
	eventRecovered  = "refresh_token"   // a new refresh token was stored for the subject
	eventInvalidate = "invalidate"      // Fortnox answered 401 to the subject's token
	eventForget     = "forget"          // the subject (a named account) was deleted
	eventDropped    = "token_dropped"   // the subject's token was dropped through the admin API
)

// tokenHash names an access token without showing it.
func tokenHash(accessToken string) string {
	sum := sha256.Sum256([]byte(accessToken))
	return hex.EncodeToString(sum[:12])
}

// errSharedUnavailable: the shared store cannot be reached.
var errSharedUnavailable = errors.New("the shared state (Redis) cannot be reached")

// localShared is the seam in one process.
type localShared struct {
	slotsMu sync.Mutex
	slots   chan struct{}

	mu            sync.Mutex
	used          map[string]time.Time  // connect states -> when they may be forgotten
	results       map[string]keptResult // connect states -> how their flow ended
	lastEvent     map[string]time.Time  // tenant -> the newest consent event applied
	invalidations map[string][]time.Time
}

func newLocalShared() *localShared {
	return &localShared{
		used:          make(map[string]time.Time),
		results:       make(map[string]keptResult),
		lastEvent:     make(map[string]time.Time),
		invalidations: make(map[string][]time.Time),
	}
}

func (l *localShared) loadToken(context.Context, subject) (*sharedToken, error) { return nil, nil }
func (l *localShared) storeToken(context.Context, subject, *sharedToken) error  { return nil }
func (l *localShared) dropToken(context.Context, subject, string) error         { return nil }
func (l *localShared) publish(context.Context, event) error                     { return nil }
func (l *localShared) lockToken(context.Context, subject) (func(), error)       { return func() {}, nil }

func (l *localShared) firstUse(_ context.Context, name string, ttl time.Duration) (bool, error) {
	n := clk.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, until := range l.used {
		if n.After(until) {
			delete(l.used, k)
		}
	}
	if _, seen := l.used[name]; seen {
		return false, nil
	}
	l.used[name] = n.Add(ttl)
	return true, nil
}

type keptResult struct {
	result string
	until  time.Time
}

func (l *localShared) keepResult(_ context.Context, name, result string, ttl time.Duration) error {
	n := clk.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, kept := range l.results {
		if n.After(kept.until) {
			delete(l.results, k)
		}
	}
	l.results[name] = keptResult{result: result, until: n.Add(ttl)}
	return nil
}

func (l *localShared) flowResult(_ context.Context, name string) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if kept, ok := l.results[name]; ok && !clk.Now().After(kept.until) {
		return kept.result, nil
	}
	return "", nil
}

func (l *localShared) newerEvent(_ context.Context, tenant string, at time.Time) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if last, ok := l.lastEvent[tenant]; ok && !at.After(last) {
		return false, nil
	}
	l.lastEvent[tenant] = at
	return true, nil
}

func (l *localShared) allowInvalidation(_ context.Context, subj subject, max int, window time.Duration) (bool, error) {
	n := clk.Now()
	key := subj.key()
	l.mu.Lock()
	defer l.mu.Unlock()
	recent := l.invalidations[key][:0]
	for _, at := range l.invalidations[key] {
		if n.Sub(at) < window {
			recent = append(recent, at)
		}
	}
	if len(recent) >= max {
		l.invalidations[key] = recent
		return false, nil
	}
	l.invalidations[key] = append(recent, n)
	return true, nil
}

// forgetIdle drops invalidation windows that have passed (called by the
// manager's sweeper).
func (l *localShared) forgetIdle(window time.Duration) {
	n := clk.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	for key, ats := range l.invalidations {
		if len(ats) == 0 || n.Sub(ats[len(ats)-1]) >= window {
			delete(l.invalidations, key)
		}
	}
}

func (l *localShared) tokenSlot(ctx context.Context, max int, wait time.Duration) (func(), error) {
	l.slotsMu.Lock()
	if l.slots == nil || cap(l.slots) != max {
		l.slots = make(chan struct{}, max) // a reload that changes max starts a new pool
	}
	slots := l.slots
	l.slotsMu.Unlock()
	release := func() { <-slots }
	select {
	case slots <- struct{}{}:
		return release, nil
	default:
	}
	metrics.TokenRequestsQueued.Inc()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case slots <- struct{}{}:
		return release, nil
	case <-t.C:
		return nil, errors.New("too many token requests of this client id in flight (max_token_requests); they queued longer than token_timeout")
	case <-ctx.Done():
		return nil, errStopping
	}
}

var _ sharedState = (*localShared)(nil)
