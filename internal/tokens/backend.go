package tokens

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"sync"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
)

// What the sidecars of one (token URL, client id) share. Fortnox's rate
// limit, its consents and its single-use refresh tokens belong to (client
// id, tenant), not to one process, so with several sidecars (one beside
// each app pod) they must be shared. Backend is the seam: LocalBackend
// keeps them in this process (no `redis` line: one sidecar, exactly as
// before), redisstate.Backend keeps them in Redis for a cluster of sidecars.
// Nothing above the seam knows which it talks to. Token records are shared
// the same way one level down: Records's backend is Caddy's storage or
// Redis. The rate budget is the handler's ratelimit.Waiter (internal/ratelimit).
type Backend interface {
	// loadToken returns the subject's access token as another sidecar
	// stored it (nil: none). Local: always nil, the memory cache is all.
	LoadToken(ctx context.Context, subj Subject) (*SharedToken, error)
	// storeToken shares an access token with the other sidecars.
	StoreToken(ctx context.Context, subj Subject, t *SharedToken) error
	// dropToken removes the subject's shared access token if it is still
	// accessToken (compare and invalidate), and tells every sidecar.
	DropToken(ctx context.Context, subj Subject, accessToken string) error
	// lockToken serializes token requests for the subject across sidecars
	// (local: nothing to do, the single flight is enough).
	LockToken(ctx context.Context, subj Subject) (unlock func(), err error)

	// publish tells the other sidecars about an event this one has
	// already applied to itself.
	Publish(ctx context.Context, ev Event) error

	// firstUse reports whether name (a connect state) is used for the
	// first time; it is remembered for ttl.
	FirstUse(ctx context.Context, name string, ttl time.Duration) (bool, error)
	// keepResult remembers how a connect flow ended (a signed result,
	// never a token) for ttl; flowResult reads it back ("" if none).
	KeepResult(ctx context.Context, name, result string, ttl time.Duration) error
	FlowResult(ctx context.Context, name string) (string, error)
	// newerEvent reports whether a consent event for tenant stamped at is
	// newer than every one applied before, and remembers it if so.
	NewerEvent(ctx context.Context, tenant string, at time.Time) (bool, error)
	// allowInvalidation reports whether a 401 may drop the subject's token:
	// at most max per window.
	AllowInvalidation(ctx context.Context, subj Subject, max int, window time.Duration) (bool, error)
	// tokenSlot waits up to wait for one of max token-request slots of the
	// client id.
	TokenSlot(ctx context.Context, max int, wait time.Duration) (release func(), err error)
}

// SharedToken is an access token as it is shared between sidecars.
type SharedToken struct {
	AccessToken string    `json:"access_token"`
	Grant       Grant     `json:"grant"`
	IssuedAt    time.Time `json:"issued_at"`
	ExpiresAt   time.Time `json:"expires_at"`
}

// Event is what one sidecar tells the others.
type Event struct {
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
	EventInvalidate = "invalidate"      // Fortnox answered 401 to the subject's token
	eventForget     = "forget"          // the subject (a named account) was deleted
	eventDropped    = "token_dropped"   // the subject's token was dropped through the admin API
)

// TokenHash names an access token without showing it.
func TokenHash(accessToken string) string {
	sum := sha256.Sum256([]byte(accessToken))
	return hex.EncodeToString(sum[:12])
}

// ErrSharedUnavailable: the shared store cannot be reached.
var ErrSharedUnavailable = errors.New("the shared state (Redis) cannot be reached")

// LocalBackend is the seam in one process.
type LocalBackend struct {
	clock   *clock.Clock
	slotsMu sync.Mutex
	slots   chan struct{}

	mu            sync.Mutex
	used          map[string]time.Time  // connect states -> when they may be forgotten
	results       map[string]keptResult // connect states -> how their flow ended
	lastEvent     map[string]time.Time  // tenant -> the newest consent event applied
	invalidations map[string][]time.Time
}

// NewLocalBackend keeps what is shared in this process, on clk (nil: real
// time).
func NewLocalBackend(clk *clock.Clock) *LocalBackend {
	return &LocalBackend{clock: clk,
		used:          make(map[string]time.Time),
		results:       make(map[string]keptResult),
		lastEvent:     make(map[string]time.Time),
		invalidations: make(map[string][]time.Time),
	}
}

func (l *LocalBackend) LoadToken(context.Context, Subject) (*SharedToken, error) { return nil, nil }
func (l *LocalBackend) StoreToken(context.Context, Subject, *SharedToken) error  { return nil }
func (l *LocalBackend) DropToken(context.Context, Subject, string) error         { return nil }
func (l *LocalBackend) Publish(context.Context, Event) error                     { return nil }
func (l *LocalBackend) LockToken(context.Context, Subject) (func(), error)       { return func() {}, nil }

func (l *LocalBackend) FirstUse(_ context.Context, name string, ttl time.Duration) (bool, error) {
	n := l.clock.Now()
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

func (l *LocalBackend) KeepResult(_ context.Context, name, result string, ttl time.Duration) error {
	n := l.clock.Now()
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

func (l *LocalBackend) FlowResult(_ context.Context, name string) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if kept, ok := l.results[name]; ok && !l.clock.Now().After(kept.until) {
		return kept.result, nil
	}
	return "", nil
}

func (l *LocalBackend) NewerEvent(_ context.Context, tenant string, at time.Time) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if last, ok := l.lastEvent[tenant]; ok && !at.After(last) {
		return false, nil
	}
	l.lastEvent[tenant] = at
	return true, nil
}

func (l *LocalBackend) AllowInvalidation(_ context.Context, subj Subject, max int, window time.Duration) (bool, error) {
	n := l.clock.Now()
	key := subj.Key()
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
func (l *LocalBackend) forgetIdle(window time.Duration) {
	n := l.clock.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	for key, ats := range l.invalidations {
		if len(ats) == 0 || n.Sub(ats[len(ats)-1]) >= window {
			delete(l.invalidations, key)
		}
	}
}

func (l *LocalBackend) TokenSlot(ctx context.Context, max int, wait time.Duration) (func(), error) {
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
		return nil, ErrStopping
	}
}

var _ Backend = (*LocalBackend)(nil)

func RandomID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
