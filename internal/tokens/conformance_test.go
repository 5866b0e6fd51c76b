package tokens_test

import (
	"context"
	"crypto/cipher"
	"errors"
	"net"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens/tokenstest"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Every implementation of the seams keeps the seam's promises: the
// in-process ones a single sidecar uses (LocalBackend, Caddy's file
// storage) and the Redis ones of a cluster of sidecars, each through a
// real redis-server.

func TestBackendConformance(t *testing.T) {
	t.Parallel()
	t.Run("local", func(t *testing.T) {
		t.Parallel()
		tokenstest.BackendSuite(t, func(*testing.T) tokens.Backend { return tokens.NewLocalBackend(clock.New()) }, tokenstest.BackendCaps{})
	})
	for _, topo := range redisTopologies {
		t.Run(topo.name, func(t *testing.T) {
			t.Parallel()
			r := newRedisSidecars(t, topo.start)
			tokenstest.BackendSuite(t, func(t *testing.T) tokens.Backend { return r.sidecar(t).Backend() }, tokenstest.BackendCaps{
				Shared:       true,
				SharedTokens: true,
				TokenLock:    true,
				Kill:         r.kill,
				LockExpiry:   redisLockTTL,
				Listen:       r.listen,
				Healthy: func(b tokens.Backend) error {
					if b.(*redisstate.Backend).Down() {
						return errors.New("the connection counts Redis as down (a call failed)")
					}
					return nil
				},
			})
		})
	}
}

func TestStorageConformance(t *testing.T) {
	t.Parallel()
	t.Run("local", func(t *testing.T) {
		t.Parallel()
		// Caddy's default storage, which a single sidecar keeps its
		// records in: the handles of one test share its directory.
		var mu sync.Mutex
		dirs := map[*testing.T]string{}
		tokenstest.StorageSuite(t, func(t *testing.T) tokens.Storage {
			mu.Lock()
			defer mu.Unlock()
			if dirs[t] == "" {
				dirs[t] = t.TempDir()
			}
			return &certmagic.FileStorage{Path: dirs[t]}
		})
	})
	for _, topo := range redisTopologies {
		t.Run(topo.name, func(t *testing.T) {
			t.Parallel()
			// Records live under their keys whatever the client id, so each
			// case starts on an empty Redis (the cases run one at a time).
			r := newRedisSidecars(t, topo.start)
			var mu sync.Mutex
			seen := map[*testing.T]bool{}
			tokenstest.StorageSuite(t, func(t *testing.T) tokens.Storage {
				mu.Lock()
				defer mu.Unlock()
				if !seen[t] {
					seen[t] = true
					if err := r.flush(context.Background()); err != nil {
						t.Fatalf("emptying Redis: %v", err)
					}
				}
				return r.sidecar(t).Records()
			})
		})
	}
}

// redisLockTTL is the Redis locks' TTL in these tests (10 s in
// production): a dead holder's lock frees itself this soon.
const redisLockTTL = 300 * time.Millisecond

// redisSidecars makes Redis connections to one redis-server, as sidecars
// have: those made for one test share a client id (the test's name), so
// they are sidecars of one client id, and different tests share nothing.
type redisSidecars struct {
	*redisServers

	mu     sync.Mutex
	owners map[tokens.Backend]*fakeOwner
	cuts   map[tokens.Backend]*cuttableDialer
}

func newRedisSidecars(t *testing.T, start func(t *testing.T) *redisServers) *redisSidecars {
	return &redisSidecars{redisServers: start(t), owners: map[tokens.Backend]*fakeOwner{}, cuts: map[tokens.Backend]*cuttableDialer{}}
}

// redisServers is Redis as one topology runs it: connect makes a sidecar's
// connection (its data connections dialled through dial), flush empties
// every node.
type redisServers struct {
	connect func(t *testing.T, owner *fakeOwner, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *redisstate.Conn
	flush   func(ctx context.Context) error
}

// redisTopologies are the three ways a sidecar reaches Redis: one server
// (url), a primary with a replica that three Sentinels watch, and a
// Cluster of three primaries.
var redisTopologies = []struct {
	name  string
	start func(t *testing.T) *redisServers
}{
	{"redis", startRedisServer},
	{"sentinel", startRedisSentinel},
	{"cluster", startRedisCluster},
}

func startRedisServer(t *testing.T) *redisServers {
	addr := startRedis(t)
	client := redis.NewClient(&redis.Options{Addr: addr})
	t.Cleanup(func() { client.Close() })
	return &redisServers{
		connect: func(t *testing.T, owner *fakeOwner, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *redisstate.Conn {
			opts, err := redisstate.ParseRedisURL("redis://" + addr + "/0")
			if err != nil {
				t.Fatal(err)
			}
			opts.Dialer = dial
			return redisstate.New(t.Name(), owner, opts, "redis://"+addr+"/0", zap.NewNop(), func() {})
		},
		flush: func(ctx context.Context) error { return client.FlushDB(ctx).Err() },
	}
}

func startRedisSentinel(t *testing.T) *redisServers {
	needBinaries(t, "redis-server")
	s := testproc.StartSentinel(t, testproc.SentinelConfig{})
	cfg := redisstate.SentinelConfig{Master: s.MasterName(), Addrs: s.SentinelAddrs()}
	client := redis.NewFailoverClient(&redis.FailoverOptions{MasterName: cfg.Master, SentinelAddrs: cfg.Addrs})
	t.Cleanup(func() { client.Close() })
	return &redisServers{
		connect: func(t *testing.T, owner *fakeOwner, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *redisstate.Conn {
			opts, err := redisstate.FailoverOptions(cfg)
			if err != nil {
				t.Fatal(err)
			}
			opts.Dialer = dial
			return redisstate.NewSentinel(t.Name(), owner, opts, redisstate.RedactSentinel(cfg), zap.NewNop(), func() {})
		},
		flush: func(ctx context.Context) error { return client.FlushDB(ctx).Err() },
	}
}

func startRedisCluster(t *testing.T) *redisServers {
	needBinaries(t, "redis-server", "redis-cli")
	c := testproc.StartCluster(t, testproc.RedisConfig{})
	cfg := redisstate.ClusterConfig{Addrs: c.Addrs()}
	client := redis.NewClusterClient(&redis.ClusterOptions{Addrs: cfg.Addrs})
	t.Cleanup(func() { client.Close() })
	return &redisServers{
		connect: func(t *testing.T, owner *fakeOwner, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *redisstate.Conn {
			opts, err := redisstate.ClusterOptions(cfg)
			if err != nil {
				t.Fatal(err)
			}
			opts.Dialer = dial
			return redisstate.NewCluster(t.Name(), owner, opts, redisstate.RedactCluster(cfg), zap.NewNop(), func() {})
		},
		flush: func(ctx context.Context) error {
			return client.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error { return node.FlushDB(ctx).Err() })
		},
	}
}

func (r *redisSidecars) sidecar(t *testing.T) *redisstate.Conn {
	t.Helper()
	dialer := &cuttableDialer{}
	owner := newFakeOwner(t.Name())
	conn := r.connect(t, owner, dialer.dial)
	conn.Records().SetLockTTL(redisLockTTL)
	t.Cleanup(func() { _ = conn.Destruct() })
	r.mu.Lock()
	r.owners[conn.Backend()] = owner
	r.cuts[conn.Backend()] = dialer
	r.mu.Unlock()
	return conn
}

// kill cuts b's sidecar off Redis for good, as its death would: its
// connections close, it dials no more, and it lets go of nothing.
func (r *redisSidecars) kill(b tokens.Backend) {
	r.mu.Lock()
	d := r.cuts[b]
	r.mu.Unlock()
	d.cut()
}

// listen waits until b's sidecar is subscribed to the cluster's events
// (its first Resync), and reports what it applied since.
func (r *redisSidecars) listen(t *testing.T, b tokens.Backend) func() []tokens.Event {
	t.Helper()
	r.mu.Lock()
	o := r.owners[b]
	r.mu.Unlock()
	select {
	case <-o.subscribed:
	case <-time.After(5 * time.Second):
		t.Fatal("the sidecar did not subscribe to the cluster's events within 5s")
	}
	return o.applied
}

// fakeOwner is the Redis connection's owner (a *tokens.Manager in
// production): it records the events it is told to apply, and notes the
// first Resync, which follows the subscription.
type fakeOwner struct {
	clientID   string
	clock      *clock.Clock
	codec      *tokens.Records
	subscribed chan struct{}
	once       sync.Once

	mu     sync.Mutex
	events []tokens.Event
}

func newFakeOwner(clientID string) *fakeOwner {
	key, err := tokens.ParseEncryptionKey("q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
	if err != nil {
		panic(err)
	}
	return &fakeOwner{
		clientID:   clientID,
		clock:      clock.New(),
		codec:      &tokens.Records{ClientID: clientID, Keys: []cipher.AEAD{key}},
		subscribed: make(chan struct{}),
	}
}

func (o *fakeOwner) ClientID() string        { return o.clientID }
func (o *fakeOwner) Clock() *clock.Clock     { return o.clock }
func (o *fakeOwner) Logger() *zap.Logger     { return zap.NewNop() }
func (o *fakeOwner) Codec() *tokens.Records  { return o.codec }
func (o *fakeOwner) Resync()                 { o.once.Do(func() { close(o.subscribed) }) }
func (o *fakeOwner) RevalidateTenant(string) {}
func (o *fakeOwner) ApplyEvent(ev tokens.Event) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.events = append(o.events, ev)
}

func (o *fakeOwner) applied() []tokens.Event {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]tokens.Event(nil), o.events...)
}

var _ redisstate.Owner = (*fakeOwner)(nil)

// cuttableDialer dials Redis until it is cut; then it closes what it
// dialled and dials no more.
type cuttableDialer struct {
	mu    sync.Mutex
	conns []net.Conn
	dead  bool
}

func (d *cuttableDialer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.dead {
		c.Close()
		return nil, errors.New("this sidecar is dead")
	}
	d.conns = append(d.conns, c)
	return c, nil
}

func (d *cuttableDialer) cut() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dead = true
	for _, c := range d.conns {
		c.Close()
	}
}

// startRedis starts a redis-server of this test's own on a free
// 127.0.0.1 port (test/testproc), stopped when the test ends. It never
// skips: without redis-server the Redis cases fail and say what to
// install (.ci/run installs it).
func startRedis(t *testing.T) (addr string) {
	t.Helper()
	needBinaries(t, "redis-server")
	return testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
}

// needBinaries fails the test (never skips it) unless every one of names
// is on PATH.
func needBinaries(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			t.Fatalf("%s is not on PATH, and the Redis conformance cases need it: install it (apt-get install redis-server, which has redis-cli too; CI does)", name)
		}
	}
}
