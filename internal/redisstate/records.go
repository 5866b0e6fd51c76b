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

	"github.com/bsm/redislock"
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
	lock *redislock.Lock
	stop context.CancelFunc
	done chan struct{}
}

func (r *Records) valueKey(key string) string { return RedisKeyPrefix + "record:" + key }
func (r *Records) indexKey() string {
	return RedisKeyPrefix + "index:" + tokens.RecordPrefix(r.c.owner.ClientID())
}
func (r *Records) lockKey(name string) string { return RedisKeyPrefix + "lock:" + name }

func (r *Records) Store(ctx context.Context, key string, value []byte) error {
	return r.c.call(ctx, "store", func(ctx context.Context) error {
		_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Set(ctx, r.valueKey(key), value, 0)
			p.SAdd(ctx, r.indexKey(), key)
			return nil
		})
		return err
	})
}

// StoreIfAbsent stores value unless the key holds one already, and says
// whether it did.
func (r *Records) StoreIfAbsent(ctx context.Context, key string, value []byte) (bool, error) {
	var stored bool
	err := r.c.call(ctx, "store", func(ctx context.Context) error {
		ok, err := r.c.client.SetNX(ctx, r.valueKey(key), value, 0).Result()
		if err != nil {
			return err
		}
		stored = ok
		return r.c.client.SAdd(ctx, r.indexKey(), key).Err()
	})
	return stored, err
}

func (r *Records) Load(ctx context.Context, key string) ([]byte, error) {
	var value []byte
	err := r.c.call(ctx, "load", func(ctx context.Context) error {
		var err error
		value, err = r.c.client.Get(ctx, r.valueKey(key)).Bytes()
		return err
	})
	if errors.Is(err, redis.Nil) {
		return nil, fs.ErrNotExist
	}
	return value, err
}

func (r *Records) Delete(ctx context.Context, key string) error {
	return r.c.call(ctx, "delete", func(ctx context.Context) error {
		_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Del(ctx, r.valueKey(key))
			p.SRem(ctx, r.indexKey(), key)
			return nil
		})
		return err
	})
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
	backoff := 5 * time.Millisecond
	for {
		var l *redislock.Lock
		err := r.c.call(ctx, "lock", func(cctx context.Context) error {
			var err error
			l, err = r.c.locker.Obtain(cctx, r.lockKey(name), r.lockTTL(), nil)
			if errors.Is(err, redislock.ErrNotObtained) {
				return nil // not an outage
			}
			return err
		})
		if err != nil {
			return err
		}
		if l != nil {
			r.keepFresh(name, l)
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the Redis lock %s: %w", name, ctx.Err())
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 100*time.Millisecond)
	}
}

// keepFresh refreshes a held lock every third of its TTL until Unlock.
func (r *Records) keepFresh(name string, l *redislock.Lock) {
	ctx, stop := context.WithCancel(context.Background())
	h := &heldRedisLock{lock: l, stop: stop, done: make(chan struct{})}
	r.mu.Lock()
	old := r.held[name]
	r.held[name] = h
	r.mu.Unlock()
	if old != nil { // ours, expired without an Unlock
		old.stop()
		<-old.done
	}
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
			err := l.Refresh(rctx, ttl, nil)
			cancel()
			if errors.Is(err, redislock.ErrNotObtained) {
				r.c.logger().Error("a Redis lock expired while held: another sidecar may have refreshed the same refresh token", zap.String("lock", name))
				return
			}
		}
	}()
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
		err := h.lock.Release(ctx)
		if errors.Is(err, redislock.ErrLockNotHeld) {
			return nil // expired meanwhile; logged by keepFresh
		}
		return err
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
