package redisstorage

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
)

func init() {
	caddy.RegisterModule(Module{})
}

// minLockTTL is the shortest lock_ttl accepted: refreshes every TTL/3 need
// room for a Redis round trip.
const minLockTTL = 100 * time.Millisecond

// Module is the Caddy storage module caddy.storage.fortnox_test_redis
// (TEST ONLY). In JSON:
//
//	"storage": {"module": "fortnox_test_redis", "address": "127.0.0.1:6379", "prefix": "caddy", "lock_ttl": "5s"}
//
// In a Caddyfile's global options:
//
//	storage fortnox_test_redis {
//		address 127.0.0.1:6379
//		prefix caddy
//		lock_ttl 5s
//	}
type Module struct {
	// Address of the Redis server, host:port. Required. Placeholders
	// such as {env.REDIS_ADDR} are resolved at provisioning.
	Address string `json:"address,omitempty"`
	// Prefix of every Redis key used. Default "caddy". Placeholders are
	// resolved at provisioning.
	Prefix string `json:"prefix,omitempty"`
	// LockTTL is how long a lock lives without being refreshed, so how
	// long a dead holder's lock lingers. Default 5s; at least 100ms.
	LockTTL caddy.Duration `json:"lock_ttl,omitempty"`

	client  *redis.Client
	storage *Storage
}

// CaddyModule returns the Caddy module information.
func (Module) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.fortnox_test_redis",
		New: func() caddy.Module { return new(Module) },
	}
}

// Provision resolves placeholders, checks the configuration, connects to
// Redis and checks that it answers.
func (m *Module) Provision(ctx caddy.Context) error {
	repl := caddy.NewReplacer()
	addr := repl.ReplaceAll(m.Address, "")
	prefix := repl.ReplaceAll(m.Prefix, "")
	if addr == "" {
		return errors.New("fortnox_test_redis: address is required")
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("fortnox_test_redis: address %q: %w", addr, err)
	}
	ttl := time.Duration(m.LockTTL)
	if ttl == 0 {
		ttl = DefaultLockTTL
	}
	if ttl < minLockTTL {
		return fmt.Errorf("fortnox_test_redis: lock_ttl %s is shorter than %s", ttl, minLockTTL)
	}

	client := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := client.Ping(pctx).Err(); err != nil {
		client.Close()
		return fmt.Errorf("fortnox_test_redis: redis at %s: %w", addr, err)
	}
	m.client = client
	m.storage = New(client, prefix, ttl)
	return nil
}

// CertMagicStorage returns the provisioned Storage.
func (m *Module) CertMagicStorage() (certmagic.Storage, error) {
	if m.storage == nil {
		return nil, errors.New("fortnox_test_redis: not provisioned")
	}
	return m.storage, nil
}

// Cleanup closes the Redis client once no lock of this module's Storage
// is held (at once if none is): a holder still in its critical section
// can still unlock, and nothing leaks.
func (m *Module) Cleanup() error {
	if m.storage != nil {
		client := m.client
		m.storage.whenUnlocked(func() { client.Close() })
	}
	return nil
}

// UnmarshalCaddyfile sets up the module from Caddyfile tokens:
//
//	storage fortnox_test_redis [<address>] {
//		address  <host:port>
//		prefix   <prefix>
//		lock_ttl <duration>
//	}
func (m *Module) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // module name
	if d.NextArg() {
		m.Address = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		opt := d.Val()
		if !d.NextArg() {
			return d.ArgErr()
		}
		val := d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
		switch opt {
		case "address":
			m.Address = val
		case "prefix":
			m.Prefix = val
		case "lock_ttl":
			ttl, err := caddy.ParseDuration(val)
			if err != nil {
				return d.Errf("lock_ttl %q: %v", val, err)
			}
			m.LockTTL = caddy.Duration(ttl)
		default:
			return d.Errf("unrecognized option %q", opt)
		}
	}
	return nil
}

// Interface guards
var (
	_ certmagic.Storage      = (*Storage)(nil)
	_ certmagic.TryLocker    = (*Storage)(nil)
	_ caddy.Module           = (*Module)(nil)
	_ caddy.Provisioner      = (*Module)(nil)
	_ caddy.CleanerUpper     = (*Module)(nil)
	_ caddy.StorageConverter = (*Module)(nil)
	_ caddyfile.Unmarshaler  = (*Module)(nil)
)
