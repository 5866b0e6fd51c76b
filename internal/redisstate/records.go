package redisstate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Token records in Redis (cluster mode). The record keys and their
// encryption are the same as in Caddy's storage (a record's key is its
// cipher's additional data), so records copy between the two as they are,
// still encrypted.

// redisLockTTL: a lock whose holder died frees itself this long after its
// last refresh; a live holder refreshes it every third of it.
const redisLockTTL = 10 * time.Second

// Records is a tokens.Storage on Redis.
type Records struct {
	c    *Conn
	mu   sync.Mutex
	held map[string]*heldRedisLock
	ttl  time.Duration // redisLockTTL unless SetLockTTL
}

// SetLockTTL sets how soon a lock whose holder died frees itself (a live
// holder refreshes it every third of it): redisLockTTL unless set. For
// tests, which cannot wait that long; call it before the first Lock.
func (r *Records) SetLockTTL(d time.Duration) { r.ttl = d }

func (r *Records) lockTTL() time.Duration {
	if r.ttl > 0 {
		return r.ttl
	}
	return redisLockTTL
}

type heldRedisLock struct {
	key   string // the Redis key
	token string // this holder's value at key
	stop  context.CancelFunc
	done  chan struct{}
}

func (r *Records) valueKey(key string) string { return RecordKey(key) }
func (r *Records) indexKey() string {
	return RedisKeyPrefix + "index:" + tokens.RecordPrefix(r.c.owner.ClientID())
}

// Store writes the value, and the key into the index (a client-wide key,
// so in a Cluster the two may be on different nodes: no MULTI spans
// them). The index first: a key it lists may be missing for a moment, but
// a stored value is never missing from it.
func (r *Records) Store(ctx context.Context, key string, value []byte) error {
	err := r.c.call(ctx, "store", func(ctx context.Context) error {
		if err := r.c.client.SAdd(ctx, r.indexKey(), key).Err(); err != nil {
			return err
		}
		return r.c.durably(ctx, r.valueKey(key), func(p redis.Pipeliner) {
			p.Set(ctx, r.valueKey(key), value, 0)
		})
	})
	if err != nil {
		return err
	}
	// A record still at its key from before the hash tags is retired, so
	// that a sidecar of an earlier version does not spend its chain.
	return r.moveLegacy(ctx, key, false)
}

// StoreIfAbsent stores value unless the key holds one already, and says
// whether it did.
func (r *Records) StoreIfAbsent(ctx context.Context, key string, value []byte) (bool, error) {
	var stored bool
	err := r.c.call(ctx, "store", func(ctx context.Context) error {
		if err := r.c.client.SAdd(ctx, r.indexKey(), key).Err(); err != nil {
			return err
		}
		var cmd *redis.BoolCmd
		err := r.c.durably(ctx, r.valueKey(key), func(p redis.Pipeliner) {
			cmd = p.SetNX(ctx, r.valueKey(key), value, 0)
		})
		if cmd != nil {
			stored = cmd.Val()
		}
		return err
	})
	return stored, err
}

func (r *Records) Load(ctx context.Context, key string) ([]byte, error) {
	value, err := r.load(ctx, r.valueKey(key))
	if errors.Is(err, fs.ErrNotExist) {
		if err := r.moveLegacy(ctx, key, true); err != nil {
			return nil, err
		}
		value, err = r.load(ctx, r.valueKey(key))
	}
	return value, err
}

func (r *Records) load(ctx context.Context, redisKey string) ([]byte, error) {
	var value []byte
	err := r.c.call(ctx, "load", func(ctx context.Context) error {
		var err error
		value, err = r.c.client.Get(ctx, redisKey).Bytes()
		return err
	})
	if errors.Is(err, redis.Nil) {
		return nil, fs.ErrNotExist
	}
	return value, err
}

// Delete deletes the record, at its key from before the hash tags too
// (else it would move back on the next Load), and from the index.
func (r *Records) Delete(ctx context.Context, key string) error {
	return r.c.call(ctx, "delete", func(ctx context.Context) error {
		if err := r.c.client.Del(ctx, r.valueKey(key)).Err(); err != nil {
			return err
		}
		if err := r.c.client.Del(ctx, legacyRecordKey(key)).Err(); err != nil {
			return err
		}
		return r.c.client.SRem(ctx, r.indexKey(), key).Err()
	})
}

// moveLegacy moves a record from its key before the hash tags
// (legacyRecordKey; copyValue: to its tagged key unless one is there
// already, else it is only retired)
// and leaves a tombstone there, so that a sidecar of an earlier version
// refuses clearly instead of spending its refresh token. The rule that
// keeps old and new sidecars on one lock per chain: an earlier version
// reads and writes a record only under its legacy lock, and the move
// happens under both the legacy lock and the new one (unless this process
// holds that already). So an old sidecar either finished with the record
// before the move (its rotated token is what moves), or finds the
// tombstone after it. Nothing to move costs one GET.
func (r *Records) moveLegacy(ctx context.Context, key string, copyValue bool) error {
	old := legacyRecordKey(key)
	live := func() ([]byte, error) {
		raw, err := r.load(ctx, old)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if _, dead := tokens.IsTombstone(raw); dead {
			return nil, nil
		}
		return raw, nil
	}
	raw, err := live()
	if raw == nil || err != nil {
		return err
	}
	if name := lockOfRecord(key); name != "" {
		r.mu.Lock()
		_, held := r.held[name]
		r.mu.Unlock()
		if !held {
			l, err := r.acquire(ctx, LockKey(name), name)
			if err != nil {
				return err
			}
			defer r.release(l)
		}
		l, err := r.acquire(ctx, legacyLockKey(name), name+" (before the hash tags)")
		if err != nil {
			return err
		}
		defer r.release(l)
		if raw, err = live(); raw == nil || err != nil {
			return err
		}
	}
	if copyValue {
		if _, err := r.StoreIfAbsent(ctx, key, raw); err != nil {
			return err
		}
	}
	stone, _ := json.Marshal(tokens.Tombstone{MovedTo: "Redis under hash-tagged keys (upgrade this sidecar)", MovedAt: r.c.clock.Now().UTC()})
	err = r.c.call(ctx, "store", func(ctx context.Context) error {
		return r.c.durably(ctx, old, func(p redis.Pipeliner) { p.Set(ctx, old, stone, 0) })
	})
	if err == nil {
		r.c.logger().Info("a token record at its Redis key from before the hash tags was replaced by a tombstone (moved to, or already at, its hash-tagged key)", zap.String("key", key), zap.Bool("copied", copyValue))
	}
	return err
}

// List lists the keys under path as Caddy's storage does: recursive, every
// key; otherwise each direct child once (a key or a "folder").
func (r *Records) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	var all []string
	err := r.c.call(ctx, "list", func(ctx context.Context) error {
		var err error
		all, err = r.c.client.SMembers(ctx, r.indexKey()).Result()
		return err
	})
	if err != nil {
		return nil, err
	}
	return childrenOf(all, path, recursive), nil
}

// childrenOf picks from keys those under path.
func childrenOf(keys []string, path string, recursive bool) []string {
	prefix := strings.TrimSuffix(path, "/") + "/"
	seen := map[string]bool{}
	var out []string
	for _, k := range keys {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok || rest == "" {
			continue
		}
		child := k
		if !recursive {
			if i := strings.IndexByte(rest, '/'); i >= 0 {
				child = prefix + rest[:i]
			}
		}
		if !seen[child] {
			seen[child] = true
			out = append(out, child)
		}
	}
	sort.Strings(out)
	return out
}

// Lock blocks until it holds the named lock, ctx is done, or Redis fails.
// The lock is kept alive in the background until Unlock; if this process
// dies, it frees itself within redisLockTTL.
func (r *Records) Lock(ctx context.Context, name string) error {
	l, err := r.acquire(ctx, LockKey(name), name)
	if err != nil {
		return err
	}
	r.mu.Lock()
	old := r.held[name]
	r.held[name] = l
	r.mu.Unlock()
	if old != nil { // ours, expired without an Unlock
		old.stop()
		<-old.done
	}
	return nil
}

// The lock is a key set if absent to this holder's random token (as
// bsm/redislock, which earlier versions used, sets it: the two exclude
// each other on one key), refreshed and released only by its holder.
var (
	refreshLockScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0`)
	releaseLockScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('DEL', KEYS[1])
end
return 0`)
)

// acquire takes the lock at the Redis key (name, for logs), blocking until
// it holds it, ctx is done, or Redis fails; it is kept fresh every third
// of its TTL until released.
func (r *Records) acquire(ctx context.Context, key, name string) (*heldRedisLock, error) {
	backoff := 5 * time.Millisecond
	token := tokens.RandomID()
	for {
		var got bool
		err := r.c.call(ctx, "lock", func(cctx context.Context) error {
			var cmd *redis.BoolCmd
			err := r.c.durably(cctx, key, func(p redis.Pipeliner) {
				cmd = p.SetNX(cctx, key, token, r.lockTTL())
			})
			if cmd != nil {
				got = cmd.Val()
			}
			return err
		})
		if err != nil {
			if got {
				// Taken, but not held as durably as it must be: let go.
				r.release(&heldRedisLock{key: key, token: token})
			}
			return nil, err
		}
		if got {
			return r.keepFresh(name, key, token), nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for the Redis lock %s: %w", name, ctx.Err())
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 100*time.Millisecond)
	}
}

// keepFresh refreshes a held lock every third of its TTL until it is
// released.
func (r *Records) keepFresh(name, key, token string) *heldRedisLock {
	ctx, stop := context.WithCancel(context.Background())
	h := &heldRedisLock{key: key, token: token, stop: stop, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		ttl := r.lockTTL()
		t := time.NewTicker(ttl / 3)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			rctx, cancel := context.WithTimeout(ctx, ttl/3)
			n, err := refreshLockScript.Run(rctx, r.c.client, []string{key}, token, ttl.Milliseconds()).Int()
			cancel()
			if err == nil && n == 0 {
				r.c.logger().Error("a Redis lock expired while held: another sidecar may have refreshed the same refresh token", zap.String("lock", name))
				return
			}
		}
	}()
	return h
}

// release stops refreshing a held lock and lets go of it (bounded; an
// error leaves it to expire).
func (r *Records) release(h *heldRedisLock) error {
	if h.stop != nil {
		h.stop()
		<-h.done
	}
	ctx, cancel := context.WithTimeout(context.Background(), tokens.SharedCallLimit)
	defer cancel()
	return r.c.call(ctx, "unlock", func(ctx context.Context) error {
		// 0: expired meanwhile (logged by keepFresh), or taken since.
		return releaseLockScript.Run(ctx, r.c.client, []string{h.key}, h.token).Err()
	})
}

func (r *Records) Unlock(ctx context.Context, name string) error {
	r.mu.Lock()
	h := r.held[name]
	delete(r.held, name)
	r.mu.Unlock()
	if h == nil {
		return fmt.Errorf("the Redis lock %s is not held", name)
	}
	h.stop()
	<-h.done
	return r.c.call(ctx, "unlock", func(ctx context.Context) error {
		return releaseLockScript.Run(ctx, r.c.client, []string{h.key}, h.token).Err()
	})
}

// releaseAll lets go of every lock still held (a cluster being destroyed).
func (r *Records) releaseAll() {
	r.mu.Lock()
	names := make([]string, 0, len(r.held))
	for name := range r.held {
		names = append(names, name)
	}
	r.mu.Unlock()
	for _, name := range names {
		ctx, cancel := context.WithTimeout(context.Background(), tokens.SharedCallLimit)
		_ = r.Unlock(ctx, name)
		cancel()
	}
}

// MigratingRecords is the record backend of cluster mode: Redis, with
// records still in Caddy's storage (from before `redis` was set) moved
// over on first use. The move is a set-if-absent, so it never overwrites
// what a refresh already wrote to Redis; then a tombstone replaces the
// record in Caddy's storage.
type MigratingRecords struct {
	*Records
	caddy certmagic.Storage
}

// Migrating is the connection's records in Redis, taking over the records
// still in caddy (Caddy's storage; nil: none) on first use.
func (c *Conn) Migrating(caddy certmagic.Storage) *MigratingRecords {
	return &MigratingRecords{Records: c.records, caddy: caddy}
}

func (mr *MigratingRecords) SharedRecords() tokens.Storage { return mr.Records }
func (mr *MigratingRecords) OldRecords() tokens.Storage {
	if mr.caddy == nil {
		return nil
	}
	return mr.caddy
}

func (mr *MigratingRecords) Load(ctx context.Context, key string) ([]byte, error) {
	value, err := mr.Records.Load(ctx, key)
	if !errors.Is(err, fs.ErrNotExist) || mr.caddy == nil {
		return value, err
	}
	old, cerr := mr.caddy.Load(ctx, key)
	if cerr != nil {
		return nil, fs.ErrNotExist // nothing (usable) there either
	}
	if _, dead := tokens.IsTombstone(old); dead {
		return nil, fs.ErrNotExist
	}
	if _, err := mr.StoreIfAbsent(ctx, key, old); err != nil {
		return nil, err
	}
	stone, _ := json.Marshal(tokens.Tombstone{MovedTo: "redis", MovedAt: mr.c.clock.Now().UTC()})
	if err := mr.caddy.Store(ctx, key, stone); err != nil {
		mr.c.logger().Warn("a record moved to Redis, but its tombstone could not be written to Caddy's storage", zap.String("key", key), zap.Error(&tokens.ScrubbedError{Err: err}))
	} else {
		mr.c.logger().Info("a token record moved from Caddy's storage to Redis", zap.String("key", key))
	}
	return mr.Records.Load(ctx, key)
}

// List lists what is in Redis and what is still to move from Caddy's
// storage.
func (mr *MigratingRecords) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	keys, err := mr.Records.List(ctx, path, recursive)
	if err != nil || mr.caddy == nil {
		return keys, err
	}
	old, cerr := mr.caddy.List(ctx, path, recursive)
	if cerr != nil {
		return keys, nil
	}
	seen := map[string]bool{}
	for _, k := range keys {
		seen[k] = true
	}
	for _, k := range old {
		if !seen[k] {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	return keys, nil
}
