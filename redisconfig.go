package fortnox

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"
)

// RedisConfig is the `redis` setting of the fortnox handler: one server's
// URL (the short form, `redis <url>` or "redis": "<url>"), or a block with
// exactly one of url, sentinel, cluster and how to log in. Placeholders
// are allowed in every value.
type RedisConfig struct {
	// One server: redis://[user:password@]host:port/db, or rediss:// for
	// TLS.
	URL string `json:"url,omitempty"`
	// A primary that Sentinel watches.
	Sentinel *RedisSentinel `json:"sentinel,omitempty"`
	// A Redis Cluster's seed addresses (host:port; a placeholder may stand
	// for several, separated by commas or spaces): any of its nodes, the
	// client learns the others.
	Cluster []string `json:"cluster,omitempty"`
	// The data nodes' user and password (with url they replace the URL's).
	// The Sentinels themselves are asked without.
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// TLS to the Sentinels and the data nodes (sentinel, cluster); with
	// url, use a rediss:// URL instead.
	TLS bool `json:"tls,omitempty"`
	// How many replicas must hold a rotated refresh token, its in-flight
	// mark and its lock before each counts as stored (Redis's WAIT on the
	// connection that wrote). Default: the current primary's connected
	// replicas, at most 1, read again after a failover.
	ReplicaAcks *int `json:"replica_acks,omitempty"`

	// short: given as a bare URL, and written back as one, so that a
	// config with `redis <url>` adapts to the JSON it always did.
	short bool
}

// RedisSentinel is a primary that Sentinel watches: the name the Sentinels
// know it by, and the Sentinels' host:port addresses (a placeholder may
// stand for several, separated by commas or spaces).
type RedisSentinel struct {
	Master string   `json:"master,omitempty"`
	Addrs  []string `json:"addrs,omitempty"`
}

// redisURL is the short form of the setting.
func redisURL(raw string) *RedisConfig { return &RedisConfig{URL: raw, short: true} }

// set reports whether cluster mode is on ("redis": "" is off, as before).
func (r *RedisConfig) set() bool {
	return r != nil && !(r.short && strings.TrimSpace(r.URL) == "")
}

// MarshalJSON writes the short form as a string, the block as an object.
func (r RedisConfig) MarshalJSON() ([]byte, error) {
	if r.short {
		return json.Marshal(r.URL)
	}
	type plain RedisConfig
	return json.Marshal(plain(r))
}

// UnmarshalJSON reads "redis": "<url>" or the object form; an unknown key
// of the object is an error.
func (r *RedisConfig) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var raw string
		if err := json.Unmarshal(b, &raw); err != nil {
			return err
		}
		*r = *redisURL(raw)
		return nil
	}
	type plain RedisConfig
	var p plain
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return fmt.Errorf("redis: a URL string or an object with url, sentinel or cluster, username, password, tls, replica_acks: %v", err)
	}
	*r = RedisConfig(p)
	return nil
}

// unmarshalCaddyfile reads `redis <url>` or `redis { … }`; the dispenser
// is on the word redis.
func (r *RedisConfig) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	block := false
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		block = true
		option := d.Val()
		switch option {
		case "url":
			if r.URL != "" {
				return d.Errf("redis: url is given twice")
			}
			if err := oneArg(d, &r.URL); err != nil {
				return err
			}
		case "sentinel":
			if r.Sentinel != nil {
				return d.Errf("redis: sentinel is given twice")
			}
			a := d.RemainingArgs()
			switch len(a) {
			case 0:
				return d.Errf("redis: sentinel needs the master's name and the Sentinels' addresses: sentinel <master> <host:port>...")
			case 1:
				return d.Errf("redis: sentinel %s has no Sentinel address: sentinel <master> <host:port>...", a[0])
			}
			r.Sentinel = &RedisSentinel{Master: a[0], Addrs: a[1:]}
		case "cluster":
			if r.Cluster != nil {
				return d.Errf("redis: cluster is given twice")
			}
			if r.Cluster = d.RemainingArgs(); len(r.Cluster) == 0 {
				return d.Errf("redis: cluster needs the nodes' addresses: cluster <host:port>...")
			}
		case "username":
			if err := oneArg(d, &r.Username); err != nil {
				return err
			}
		case "password":
			if err := oneArg(d, &r.Password); err != nil {
				return err
			}
		case "tls":
			if d.NextArg() {
				return d.ArgErr()
			}
			r.TLS = true
		case "replica_acks":
			var raw string
			if err := oneArg(d, &raw); err != nil {
				return err
			}
			n, err := strconv.Atoi(raw)
			if err != nil || n < 0 {
				return d.Errf("redis: replica_acks: %q is not a number of replicas (0 or more)", raw)
			}
			r.ReplicaAcks = &n
		default:
			return d.Errf("redis: unrecognized option %q (url, sentinel, cluster, username, password, tls, replica_acks)", option)
		}
	}
	switch {
	case len(args) > 1:
		return d.Errf("redis takes one URL, or a block")
	case len(args) == 1 && block:
		return d.Errf("redis takes a URL or a block, not both")
	case len(args) == 1:
		*r = *redisURL(args[0])
		return nil
	case !block:
		return d.Errf("redis needs a URL (redis <url>) or a block (redis { url …|sentinel …|cluster … })")
	}
	if err := r.check(); err != nil {
		return d.Err(err.Error())
	}
	return nil
}

// check finds the mistakes that need no placeholder resolved.
func (r *RedisConfig) check() error {
	if r.short {
		return nil
	}
	var kinds []string
	if r.URL != "" {
		kinds = append(kinds, "url")
	}
	if r.Sentinel != nil {
		kinds = append(kinds, "sentinel")
	}
	if len(r.Cluster) > 0 {
		kinds = append(kinds, "cluster")
	}
	switch len(kinds) {
	case 0:
		return errors.New("redis: give one of url, sentinel or cluster")
	case 1:
	default:
		return fmt.Errorf("redis: %s are both set; give exactly one of url, sentinel, cluster", strings.Join(kinds, " and "))
	}
	if s := r.Sentinel; s != nil {
		if strings.TrimSpace(s.Master) == "" {
			return errors.New("redis: sentinel has no master name: sentinel <master> <host:port>...")
		}
		if len(s.Addrs) == 0 {
			return fmt.Errorf("redis: sentinel %s has no Sentinel address: sentinel <master> <host:port>...", s.Master)
		}
	}
	if r.URL != "" && r.TLS {
		return errors.New("redis: tls is for sentinel and cluster; for one server, use a rediss:// URL")
	}
	if r.ReplicaAcks != nil && *r.ReplicaAcks < 0 {
		return fmt.Errorf("redis: replica_acks must not be negative (%d)", *r.ReplicaAcks)
	}
	return nil
}

// redisTarget is a resolved redis setting: its name in logs and in the
// pool key (never the password), a tag that tells apart the credentials
// without showing them, and how to make the connection.
type redisTarget struct {
	name    string
	secrets string
	connect func(key string, m *tokens.Manager, logger *zap.Logger, repick func()) *redisstate.Conn
}

// target resolves the setting's placeholders and checks it, without
// connecting. Its errors never hold the password.
func (r *RedisConfig) target(repl *caddy.Replacer) (*redisTarget, error) {
	tg, err := r.topology(repl)
	if err != nil || r.ReplicaAcks == nil {
		return tg, err
	}
	// replica_acks set: its own connection (and pool key).
	n, connect := *r.ReplicaAcks, tg.connect
	tg.name += " replica_acks " + strconv.Itoa(n)
	tg.connect = func(key string, m *tokens.Manager, logger *zap.Logger, repick func()) *redisstate.Conn {
		c := connect(key, m, logger, repick)
		c.SetReplicaAcks(n)
		return c
	}
	return tg, nil
}

// topology is target without replica_acks.
func (r *RedisConfig) topology(repl *caddy.Replacer) (*redisTarget, error) {
	if err := r.check(); err != nil {
		return nil, err
	}
	optional := func(name, raw string) (string, error) {
		if strings.TrimSpace(raw) == "" {
			return "", nil
		}
		return resolveSetting(repl, name, raw)
	}
	username, err := optional("redis username", r.Username)
	if err != nil {
		return nil, err
	}
	password, err := optional("redis password", r.Password)
	if err != nil {
		return nil, err
	}
	switch {
	case len(r.Cluster) > 0:
		addrs := expandAddrs(repl, r.Cluster)
		if len(addrs) == 0 {
			return nil, errors.New("redis: cluster has no node address once its placeholders are resolved")
		}
		cfg := redisstate.ClusterConfig{Addrs: addrs, Username: username, Password: password, TLS: r.TLS}
		opts, err := redisstate.ClusterOptions(cfg)
		if err != nil {
			return nil, err
		}
		name := redisstate.RedactCluster(cfg)
		return &redisTarget{
			name:    name,
			secrets: secretTag(password),
			connect: func(key string, m *tokens.Manager, logger *zap.Logger, repick func()) *redisstate.Conn {
				return redisstate.NewCluster(key, m, opts, name, logger, repick)
			},
		}, nil
	case r.Sentinel != nil:
		master, err := resolveSetting(repl, "redis sentinel master", r.Sentinel.Master)
		if err != nil {
			return nil, err
		}
		addrs := expandAddrs(repl, r.Sentinel.Addrs)
		if len(addrs) == 0 {
			return nil, fmt.Errorf("redis: sentinel %s has no Sentinel address once its placeholders are resolved", master)
		}
		cfg := redisstate.SentinelConfig{Master: master, Addrs: addrs, Username: username, Password: password, TLS: r.TLS}
		opts, err := redisstate.FailoverOptions(cfg)
		if err != nil {
			return nil, err
		}
		name := redisstate.RedactSentinel(cfg)
		return &redisTarget{
			name:    name,
			secrets: secretTag(password),
			connect: func(key string, m *tokens.Manager, logger *zap.Logger, repick func()) *redisstate.Conn {
				return redisstate.NewSentinel(key, m, opts, name, logger, repick)
			},
		}, nil
	default:
		raw, err := resolveSetting(repl, "redis", r.URL)
		if err != nil {
			return nil, err
		}
		opts, err := redisstate.ParseRedisURL(raw)
		if err != nil {
			return nil, err
		}
		if username != "" {
			opts.Username = username
		}
		if password != "" {
			opts.Password = password
		}
		name := redisstate.RedactURL(raw) + redisstate.RedactLogin(username, password, false)
		return &redisTarget{
			name:    name,
			secrets: secretTag(opts.Password),
			connect: func(key string, m *tokens.Manager, logger *zap.Logger, repick func()) *redisstate.Conn {
				return redisstate.New(key, m, opts, name, logger, repick)
			},
		}, nil
	}
}

// expandAddrs resolves the placeholders of host:port addresses; one may
// stand for several, separated by commas or spaces.
func expandAddrs(repl *caddy.Replacer, raws []string) []string {
	var addrs []string
	for _, raw := range raws {
		v := repl.ReplaceAll(raw, "")
		addrs = append(addrs, strings.FieldsFunc(v, func(c rune) bool { return c == ',' || c == ' ' || c == '\t' || c == '\n' })...)
	}
	return addrs
}

// secretKey keys secretTag: random per process, so a tag says nothing of
// the password outside it.
var secretKey = func() []byte {
	k := make([]byte, 32)
	_, _ = rand.Read(k)
	return k
}()

// secretTag tells two passwords apart in a pool key without holding
// either ("" for none).
func secretTag(password string) string {
	if password == "" {
		return ""
	}
	mac := hmac.New(sha256.New, secretKey)
	mac.Write([]byte(password))
	return hex.EncodeToString(mac.Sum(nil)[:12])
}
