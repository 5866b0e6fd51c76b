// Package redisstorage is a TEST-ONLY certmagic.Storage over a single
// Redis server, with a Caddy module (caddy.storage.fortnox_test_redis)
// wrapping it. It exists so that multi-replica tests can run several
// Caddy instances against one networked store, the way users with many
// pods share a Redis-backed Caddy storage. It is not meant for
// production use.
//
// Key layout, for a prefix P:
//
//	P:v:<key>     hash with fields "d" (the value) and "m" (modification
//	              time, Unix nanoseconds) for each stored key
//	P:idx         sorted set (all scores 0) of every stored key, so that
//	              directories and List can be answered by lexical range
//	P:lock:<name> redislock lock for name
//
// Directories are implicit: a directory exists while some stored key lies
// under it. Store refuses to store a key under a stored key, or at a key
// that is a directory, just as a file system would.
//
// The Lua scripts build key names from the prefix, so this works against a
// single Redis server, not Redis Cluster.
package redisstorage

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bsm/redislock"
	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
)

// DefaultLockTTL is the lock time-to-live used when none is given. A lock
// whose holder stops refreshing it (for example because its process was
// killed) frees itself at most this long after its last refresh.
const DefaultLockTTL = 5 * time.Second

// Storage is a certmagic.Storage (and certmagic.TryLocker) over Redis.
// Several Storage values, in one process or many, that use the same Redis
// server and prefix share their keys and exclude each other's locks.
// A Storage is safe for concurrent use.
type Storage struct {
	client *redis.Client
	locker *redislock.Client
	prefix string
	ttl    time.Duration

	mu     sync.Mutex
	held   map[string]*heldLock // locks this instance holds, by name
	onIdle func()               // run once when held next becomes empty
}

// New returns a Storage that keeps its keys in client under prefix
// (default "caddy" when empty) and whose locks live for lockTTL (default
// DefaultLockTTL when <= 0) unless refreshed. The caller keeps ownership of
// client; it must reach a single Redis server.
func New(client *redis.Client, prefix string, lockTTL time.Duration) *Storage {
	if prefix == "" {
		prefix = "caddy"
	}
	if lockTTL <= 0 {
		lockTTL = DefaultLockTTL
	}
	return &Storage{
		client: client,
		locker: redislock.New(client),
		prefix: prefix,
		ttl:    lockTTL,
		held:   make(map[string]*heldLock),
	}
}

// String identifies the storage (certmagic and Caddy print storages).
func (s *Storage) String() string {
	return "fortnox_test_redis:" + s.client.Options().Addr + "/" + s.prefix
}

// normKey cleans key the way a file path would be cleaned, without
// leading or trailing slashes; "" is the root.
func normKey(key string) string {
	return strings.Trim(path.Clean("/"+key), "/")
}

func (s *Storage) valueKey(key string) string { return s.prefix + ":v:" + key }
func (s *Storage) indexKey() string           { return s.prefix + ":idx" }
func (s *Storage) lockKey(name string) string { return s.prefix + ":lock:" + name }

func notExist(op, key string) error {
	return &fs.PathError{Op: op, Path: key, Err: fs.ErrNotExist}
}

// Errors returned by Store when the key conflicts with the implicit
// directory tree (as ENOTDIR and EISDIR would on a file system).
var (
	ErrParentIsFile = errors.New("redisstorage: a parent of the key is a stored key, not a directory")
	ErrIsDirectory  = errors.New("redisstorage: the key is a directory")
)

// storeScript stores a value atomically, after checking that no parent of
// the key is itself a stored key and that the key is not a directory.
// ARGV: prefix, key, value, modification time.
var storeScript = redis.NewScript(`
local p, k = ARGV[1], ARGV[2]
local idx = p .. ":idx"
local i = 0
while true do
  i = string.find(k, "/", i + 1, true)
  if not i then break end
  if redis.call("ZSCORE", idx, string.sub(k, 1, i - 1)) then
    return redis.error_reply("PARENTISFILE")
  end
end
if #redis.call("ZRANGEBYLEX", idx, "[" .. k .. "/", "(" .. k .. "0", "LIMIT", 0, 1) > 0 then
  return redis.error_reply("ISDIR")
end
redis.call("HSET", p .. ":v:" .. k, "d", ARGV[3], "m", ARGV[4])
redis.call("ZADD", idx, 0, k)
return 1
`)

// deleteScript atomically deletes a key and every key under it.
// ARGV: prefix, key ("" deletes everything under the prefix).
var deleteScript = redis.NewScript(`
local p, k = ARGV[1], ARGV[2]
local idx = p .. ":idx"
local under
if k == "" then
  under = redis.call("ZRANGEBYLEX", idx, "-", "+")
else
  under = redis.call("ZRANGEBYLEX", idx, "[" .. k .. "/", "(" .. k .. "0")
  table.insert(under, k)
end
for _, m in ipairs(under) do
  redis.call("DEL", p .. ":v:" .. m)
  redis.call("ZREM", idx, m)
end
return #under
`)

// Store puts value at key, overwriting any value there.
func (s *Storage) Store(ctx context.Context, key string, value []byte) error {
	key = normKey(key)
	if key == "" {
		return errors.New("redisstorage: store: empty key")
	}
	mod := strconv.FormatInt(time.Now().UnixNano(), 10)
	err := storeScript.Run(ctx, s.client, nil, s.prefix, key, value, mod).Err()
	switch {
	case err == nil:
		return nil
	case strings.Contains(err.Error(), "PARENTISFILE"):
		return fmt.Errorf("store %s: %w", key, ErrParentIsFile)
	case strings.Contains(err.Error(), "ISDIR"):
		return fmt.Errorf("store %s: %w", key, ErrIsDirectory)
	default:
		return fmt.Errorf("redisstorage: store %s: %w", key, err)
	}
}

// Load returns the value at key; if there is none, the error satisfies
// errors.Is(err, fs.ErrNotExist).
func (s *Storage) Load(ctx context.Context, key string) ([]byte, error) {
	key = normKey(key)
	v, err := s.client.HGet(ctx, s.valueKey(key), "d").Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, notExist("load", key)
	}
	if err != nil {
		return nil, fmt.Errorf("redisstorage: load %s: %w", key, err)
	}
	return v, nil
}

// Delete deletes key and, if it is a directory, every key under it.
// Deleting a key that does not exist is not an error.
func (s *Storage) Delete(ctx context.Context, key string) error {
	key = normKey(key)
	if err := deleteScript.Run(ctx, s.client, nil, s.prefix, key).Err(); err != nil {
		return fmt.Errorf("redisstorage: delete %s: %w", key, err)
	}
	return nil
}

// isFile reports whether key is a stored key.
func (s *Storage) isFile(ctx context.Context, key string) (bool, error) {
	if key == "" {
		return false, nil
	}
	n, err := s.client.Exists(ctx, s.valueKey(key)).Result()
	return n > 0, err
}

// under returns the stored keys strictly under key ("" for all of them),
// in lexical order. limit <= 0 means no limit.
func (s *Storage) under(ctx context.Context, key string, limit int64) ([]string, error) {
	by := &redis.ZRangeBy{Min: "-", Max: "+"}
	if key != "" {
		by = &redis.ZRangeBy{Min: "[" + key + "/", Max: "(" + key + "0"}
	}
	if limit > 0 {
		by.Count = limit
	}
	return s.client.ZRangeByLex(ctx, s.indexKey(), by).Result()
}

// Exists reports whether key is a stored key or a directory. The root ("")
// always exists. Errors count as "does not exist".
func (s *Storage) Exists(ctx context.Context, key string) bool {
	key = normKey(key)
	if key == "" {
		return true
	}
	if ok, err := s.isFile(ctx, key); err != nil || ok {
		return ok
	}
	keys, err := s.under(ctx, key, 1)
	return err == nil && len(keys) > 0
}

// List returns the keys and directories directly in dir, or, if recursive,
// every key and directory below it, like certmagic.FileStorage. Listing a
// stored key (not a directory) returns no keys; listing something that does
// not exist returns an error satisfying errors.Is(err, fs.ErrNotExist).
// The result is sorted.
func (s *Storage) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	dir = normKey(dir)
	keys, err := s.under(ctx, dir, 0)
	if err != nil {
		return nil, fmt.Errorf("redisstorage: list %s: %w", dir, err)
	}
	if len(keys) == 0 && dir != "" {
		ok, err := s.isFile(ctx, dir)
		if err != nil {
			return nil, fmt.Errorf("redisstorage: list %s: %w", dir, err)
		}
		if !ok {
			return nil, notExist("list", dir)
		}
		return nil, nil
	}
	base := dir
	if base != "" {
		base += "/"
	}
	seen := make(map[string]bool)
	var out []string
	add := func(k string) {
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	for _, k := range keys {
		rel := strings.TrimPrefix(k, base)
		if !recursive {
			first, _, _ := strings.Cut(rel, "/")
			add(base + first)
			continue
		}
		// every directory between dir and k, then k itself
		for i := 0; i < len(rel); i++ {
			if rel[i] == '/' {
				add(base + rel[:i])
			}
		}
		add(k)
	}
	sort.Strings(out)
	return out, nil
}

// Stat returns information about key. A stored key has IsTerminal set,
// its size and modification time; a directory has IsTerminal false and no
// size or time. A missing key gives an error satisfying
// errors.Is(err, fs.ErrNotExist).
func (s *Storage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	key = normKey(key)
	var size *redis.IntCmd
	var mod *redis.StringCmd
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		size = p.HStrLen(ctx, s.valueKey(key), "d")
		mod = p.HGet(ctx, s.valueKey(key), "m")
		return nil
	})
	switch {
	case err == nil:
		nanos, err := strconv.ParseInt(mod.Val(), 10, 64)
		if err != nil {
			return certmagic.KeyInfo{}, fmt.Errorf("redisstorage: stat %s: bad modification time: %w", key, err)
		}
		return certmagic.KeyInfo{
			Key:        key,
			Modified:   time.Unix(0, nanos),
			Size:       size.Val(),
			IsTerminal: true,
		}, nil
	case errors.Is(err, redis.Nil):
		// not a stored key; maybe a directory
	default:
		return certmagic.KeyInfo{}, fmt.Errorf("redisstorage: stat %s: %w", key, err)
	}
	if key != "" {
		keys, err := s.under(ctx, key, 1)
		if err != nil {
			return certmagic.KeyInfo{}, fmt.Errorf("redisstorage: stat %s: %w", key, err)
		}
		if len(keys) == 0 {
			return certmagic.KeyInfo{}, notExist("stat", key)
		}
	}
	return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
}
