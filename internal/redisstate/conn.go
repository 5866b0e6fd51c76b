package redisstate

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// clusterGen numbers clusters in provisioning order: the newest one of a
// manager is the one it uses.
var clusterGen atomic.Uint64

// RedisKeyPrefix starts every Redis key the plugin writes.
const RedisKeyPrefix = "caddy-fortnox:"

// Owner is what the Redis code needs of the tokens it serves: it
// never sees the token manager itself.
type Owner interface {
	ClientID() string
	// Clock is the owner's clock.
	Clock() *clock.Clock
	Logger() *zap.Logger
	// Codec seals what is shared, as records are sealed.
	Codec() *tokens.Records
	// ApplyEvent applies another sidecar's event; Resync reads the shared
	// state again after an outage or a new subscription.
	ApplyEvent(ev tokens.Event)
	Resync()
	// RevalidateTenant is Resync for one tenant, whose shared state
	// changed since this sidecar last looked (generation.go).
	RevalidateTenant(tenant string)
}

// Conn is the Redis connection of one (token URL, client id).
type Conn struct {
	clock *clock.Clock // the owner's
	gen   uint64
	key   string
	owner Owner
	// repick makes the owner use its newest live cluster (the glue's).
	repick func()
	// client is a *redis.Client (one server, or the primary Sentinel
	// names) or a *redis.ClusterClient.
	client   redis.UniversalClient
	replicas replicas
	backend  *Backend
	records  *Records
	redacted string // the URL without its password, for logs
	origin   string // this sidecar, in the events it sends

	down atomic.Bool // an outage is under way (logged once)
	// probing is set while probeUntilUp runs (one at a time); lifecycle
	// orders its start against Destruct.
	probing   atomic.Bool
	lifecycle sync.Mutex
	// upSince is when (c.clock, unix ns) Redis last became reachable: the
	// Conn was made, or an outage ended. See Limiter.trusts.
	upSince atomic.Int64
	// downSince is when (c.clock, unix ns) the last outage began (0: none
	// yet). See outageGate.
	downSince atomic.Int64
	// sidecars is the count of live sidecars kept from the registry
	// (sidecars.go), lastCount the last one read; registered is set once
	// this one is in it.
	sidecars   atomic.Int64
	lastCount  atomic.Int64
	registered atomic.Bool
	ctx        context.Context
	cancel     context.CancelFunc
	background sync.WaitGroup
}

// ParseRedisURL checks a `redis` setting without connecting.
// Every call is bounded, whichever way Redis is reached: a slow Redis must
// not hold requests up.
const (
	dialTimeout = 2 * time.Second
	ioTimeout   = time.Second // reading and writing
	poolTimeout = 2 * time.Second
	maxRetries  = 1
)

func ParseRedisURL(raw string) (*redis.Options, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "" {
		return nil, fmt.Errorf("redis %q is not a redis:// or rediss:// URL (redis://[user:password@]host:port/db)", RedactURL(raw))
	}
	opts, err := redis.ParseURL(raw)
	if err != nil {
		return nil, fmt.Errorf("redis %s: %v", RedactURL(raw), redactErr(err, raw))
	}
	opts.DialTimeout, opts.ReadTimeout, opts.WriteTimeout = dialTimeout, ioTimeout, ioTimeout
	opts.PoolTimeout, opts.MaxRetries = poolTimeout, maxRetries
	return opts, nil
}

// RedactURL hides a Redis URL's password.
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	if u.User == nil && strings.Contains(raw, "@") {
		// Not parsed as user@host (redis//u:pw@h, say): it may hold a
		// password all the same.
		return "(a malformed URL, not shown: it may hold a password)"
	}
	return u.Redacted()
}

// redactErr keeps a Redis URL's password out of an error text.
func redactErr(err error, raw string) error {
	if u, perr := url.Parse(raw); perr == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok && pw != "" && strings.Contains(err.Error(), pw) {
			return errors.New(strings.ReplaceAll(err.Error(), pw, "xxxxx"))
		}
	}
	return err
}

// New makes the Redis connection of one (token URL, client id) for owner:
// no network until it is used (the subscription and the persistence
// check start shortly after). key names it in the glue's pool; repick is
// called once it is closed, so that the owner moves to its newest live
// connection.
func New(key string, owner Owner, opts *redis.Options, redacted string, logger *zap.Logger, repick func()) *Conn {
	return newWithClient(key, owner, redis.NewClient(opts), redacted, logger, repick)
}

// NewSentinel is New for a primary that Sentinel watches (opts from
// FailoverOptions): the failover client follows the primary Sentinel names.
func NewSentinel(key string, owner Owner, opts *redis.FailoverOptions, redacted string, logger *zap.Logger, repick func()) *Conn {
	return newWithClient(key, owner, redis.NewFailoverClient(opts), redacted, logger, repick)
}

// NewCluster is New for a Redis Cluster (opts from ClusterOptions): each
// tenant's keys share one hash tag, so its scripts run on one node.
func NewCluster(key string, owner Owner, opts *redis.ClusterOptions, redacted string, logger *zap.Logger, repick func()) *Conn {
	return newWithClient(key, owner, redis.NewClusterClient(opts), redacted, logger, repick)
}

// newWithClient is New with its client made: the Conn owns it and closes it
// in Destruct.
func newWithClient(key string, owner Owner, client redis.UniversalClient, redacted string, logger *zap.Logger, repick func()) *Conn {
	logClientTo(logger)
	ctx, cancel := context.WithCancel(context.Background())
	origin := make([]byte, 8)
	_, _ = rand.Read(origin)
	c := &Conn{
		gen:      clusterGen.Add(1),
		key:      key,
		owner:    owner,
		clock:    owner.Clock(),
		repick:   repick,
		client:   client,
		redacted: redacted,
		origin:   hex.EncodeToString(origin),
		ctx:      ctx,
		cancel:   cancel,
	}
	c.replicas.configured.Store(-1)
	c.records = &Records{c: c, held: make(map[string]*heldRedisLock)}
	c.backend = newRedisShared(c)
	c.upSince.Store(c.clock.Now().UnixNano())
	c.sidecars.Store(1)
	c.background.Add(2)
	go c.beat()
	go func() {
		defer c.background.Done()
		// Not at once: `caddy validate` provisions and cleans up right
		// away, and must not touch the network.
		select {
		case <-ctx.Done():
			return
		case <-time.After(300 * time.Millisecond):
		}
		c.checkPersistence(logger)
		c.subscribe(logger)
	}()
	return c
}

// Gen numbers connections in the order they were made: the newest live
// one of an owner is the one it uses.
func (c *Conn) Gen() uint64 { return c.gen }

// Closed reports whether the connection was closed (Destruct).
func (c *Conn) Closed() bool { return c.ctx.Err() != nil }

// Backend is what the sidecars share through this connection
// (tokens.Backend, with what only cluster mode has).
func (c *Conn) Backend() *Backend { return c.backend }

// Records is the records' store in Redis (tokens.Storage).
func (c *Conn) Records() *Records { return c.records }

// Down reports whether an outage is under way.
func (c *Conn) Down() bool { return c.down.Load() }

// Destruct implements caddy.Destructor: the last config using this
// connection is gone.
func (c *Conn) Destruct() error {
	c.lifecycle.Lock()
	c.cancel()
	c.lifecycle.Unlock()
	c.background.Wait()
	c.unregister()
	c.records.releaseAll()
	c.repick()
	return c.client.Close()
}

// logger is the manager's logger, named for Redis.
func (c *Conn) logger() *zap.Logger {
	return c.owner.Logger().With(zap.String("redis", c.redacted))
}

// failed notes a failed Redis call: counted, and logged once per outage.
func (c *Conn) failed(op string, err error) {
	if err == nil || errors.Is(err, redis.Nil) {
		return
	}
	metrics.RedisErrors.Inc()
	if cc, ok := c.client.(*redis.ClusterClient); ok {
		// A node may have died and its replica taken its slots: the
		// client learns the slot map again only on MOVED or every 10 s,
		// so ask it to now (in the background, once however many ask).
		cc.ReloadState(c.ctx)
	}
	if c.down.CompareAndSwap(false, true) {
		c.downSince.Store(c.clock.Now().UnixNano())
		c.startProbing()
		c.logger().Warn("Redis cannot be reached: valid tokens keep being served, client credentials are fetched directly, the rate limit is kept per sidecar, and refresh tokens wait for Redis (their tenants get 503 once their token expires)",
			zap.String("op", op), zap.Error(err))
	}
}

// ok notes a Redis call that worked: the end of an outage is logged once,
// and what was shared meanwhile is read again.
func (c *Conn) ok() {
	if !c.down.Load() {
		return
	}
	// Before down goes false: a turn that sees Redis up sees the new
	// upSince too.
	c.upSince.Store(c.clock.Now().UnixNano())
	if c.down.CompareAndSwap(true, false) {
		c.logger().Info("Redis can be reached again: the cluster's state is shared again")
		go c.owner.Resync()
	}
}

// outageProbeEvery: during an outage, calls fail at once, and a probe in
// the background (probeUntilUp) tries Redis this often to find out whether
// it is back. A slow or unreachable Redis then costs requests nothing: no
// request waits for a dial that fails.
const outageProbeEvery = 500 * time.Millisecond

// call bounds one Redis call and notes its outcome; during an outage it
// fails at once.
func (c *Conn) call(ctx context.Context, op string, fn func(ctx context.Context) error) error {
	if c.down.Load() {
		metrics.RedisErrors.Inc()
		return fmt.Errorf("%w: %s: Redis was unreachable moments ago", tokens.ErrSharedUnavailable, op)
	}
	return c.attempt(ctx, op, fn)
}

// attempt is call without the outage's shortcut (the probe's).
func (c *Conn) attempt(ctx context.Context, op string, fn func(ctx context.Context) error) error {
	if err := ctx.Err(); err != nil {
		return err // the caller gave up: not Redis's failure
	}
	cctx, cancel := context.WithTimeout(ctx, tokens.SharedCallLimit)
	defer cancel()
	start := time.Now()
	err := fn(cctx)
	metrics.RedisDuration.Observe(time.Since(start).Seconds())
	if err != nil && ctx.Err() != nil {
		return ctx.Err() // the caller gave up meanwhile: not an outage
	}
	if isReplicaAcks(err) {
		// Redis answered: not an outage, but not stored as it must be.
		c.ok()
		return fmt.Errorf("Redis %s: %w", op, err)
	}
	if err != nil && !errors.Is(err, redis.Nil) {
		c.failed(op, err)
		return fmt.Errorf("%w: %s: %v", tokens.ErrSharedUnavailable, op, err)
	}
	c.ok()
	return err
}

// probeUntilUp tries a command every outageProbeEvery until one works
// (ok() then logs the end of the outage and reads the shared state), the
// outage ends otherwise, or the cluster is destroyed: the end of an outage
// is noticed without waiting for a request.
func (c *Conn) probeUntilUp() {
	defer c.background.Done()
	for {
		c.probeWhileDown()
		c.probing.Store(false)
		// An outage that began as this one ended found the probe still
		// running, and started none: this one goes on.
		if !c.down.Load() || c.ctx.Err() != nil || !c.probing.CompareAndSwap(false, true) {
			return
		}
	}
}

func (c *Conn) probeWhileDown() {
	t := time.NewTicker(outageProbeEvery)
	defer t.Stop()
	for c.down.Load() {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(c.ctx, tokens.SharedCallLimit)
		_ = c.attempt(ctx, "ping", func(ctx context.Context) error { return c.client.Ping(ctx).Err() })
		cancel()
	}
}

// startProbing starts probeUntilUp unless it runs already or the Conn is
// being destroyed.
func (c *Conn) startProbing() {
	c.lifecycle.Lock()
	defer c.lifecycle.Unlock()
	if c.ctx.Err() != nil || !c.probing.CompareAndSwap(false, true) {
		return
	}
	c.background.Add(1)
	go c.probeUntilUp()
}

// checkPersistence warns unless a rotated refresh token is on disk before
// Redis answers: Redis holds the only copy of single-use refresh tokens.
func (c *Conn) checkPersistence(logger *zap.Logger) {
	ctx, cancel := context.WithTimeout(c.ctx, 3*time.Second)
	defer cancel()
	log := logger.With(zap.String("redis", c.redacted))
	cfg, err := c.client.ConfigGet(ctx, "append*").Result()
	if err != nil {
		if c.ctx.Err() == nil {
			log.Warn("could not check Redis's persistence (CONFIG GET refused or Redis unreachable): run it with appendonly yes and appendfsync always, since it holds the only copy of rotated refresh tokens", zap.Error(err))
		}
		return
	}
	switch {
	case cfg["appendonly"] != "yes":
		log.Warn("Redis runs without its append-only file (appendonly no): a Redis restart loses every rotated refresh token, and the customers must authorize again. Run it with appendonly yes and appendfsync always")
	case cfg["appendfsync"] != "always":
		log.Warn("Redis writes its append-only file with appendfsync "+cfg["appendfsync"]+": a rotated refresh token may be lost if Redis's host fails within that second. Use appendfsync always (refresh-token writes are rare, so it costs little)",
			zap.String("appendfsync", cfg["appendfsync"]))
	default:
		log.Info("Redis persistence checked: appendonly yes, appendfsync always")
	}
}
