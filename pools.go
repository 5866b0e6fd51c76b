package fortnox

import (
	"strings"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Cluster mode: `redis <url>` (or a redis block) in the fortnox block makes every handler of
// that (token URL, client id) share its tenants' rate budget, tokens,
// refresh tokens and revocations with the other sidecars through Redis.
//
// The connection is registered when the fortnox handler is provisioned
// (its own UsagePool entry, released in Cleanup), so fortnox_webhook,
// fortnox_connect and the admin API of the same client find it through
// the token manager even when a webhook is a sidecar's first request.
// Provision touches no network: go-redis connects on first use, and the
// subscription and the persistence check start shortly after.

// clk is the glue's clock, which every Manager it makes holds: time.Now
// plus an offset that the root's tests move (clk.Advance). Production code
// never moves it.
var clk = clock.New()

// clusters holds one *redisstate.Conn per (token URL, client id, redis
// setting): the setting by its redacted name and a tag of its password.
var clusters = caddy.NewUsagePool()

// joinCluster takes a hold on the Redis connection of m's client for
// target, creating it if needed, and makes it m's: the newest wins. The
// caller releases it with leaveCluster(key) in its Cleanup.
func joinCluster(m *tokens.Manager, target *redisTarget, logger *zap.Logger) (*redisstate.Conn, string, error) {
	key := managerKey(m.TokenURL, m.ClientID()) + "\x00" + target.name + "\x00" + target.secrets
	val, _, err := clusters.LoadOrNew(key, func() (caddy.Destructor, error) {
		return target.connect(key, m, logger, func() { pickCluster(m) }), nil
	})
	if err != nil {
		return nil, "", err
	}
	c := val.(*redisstate.Conn)
	pickCluster(m)
	return c, key, nil
}

// leaveCluster releases a hold taken by joinCluster ("" = none taken).
func leaveCluster(key string) error {
	if key == "" {
		return nil
	}
	_, err := clusters.Delete(key)
	return err
}

// pickCluster makes the newest live cluster of m's client the one m uses
// (none: m works in this process only).
func pickCluster(m *tokens.Manager) {
	prefix := managerKey(m.TokenURL, m.ClientID()) + "\x00"
	var newest *redisstate.Conn
	clusters.Range(func(k, v any) bool {
		c := v.(*redisstate.Conn)
		if strings.HasPrefix(k.(string), prefix) && !c.Closed() && (newest == nil || c.Gen() > newest.Gen()) {
			newest = c
		}
		return true
	})
	if newest == nil {
		m.Cluster.Store(nil)
		return
	}
	m.Cluster.Store(&tokens.ClusterRef{ClusterState: newest.Backend()})
}

// managers holds one tokens.Manager per (token_url, client_id), shared by all
// handlers of all loaded configs, so that cached tokens survive a config
// reload. Keyed by managerKey.
var managers = caddy.NewUsagePool()

func managerKey(tokenURL, clientID string) string {
	return tokenURL + "\x00" + clientID
}

// joinManager takes a hold on the shared token manager of (tokenURL,
// clientID), creating it if needed; the caller releases it with
// leaveManager(key) in its Cleanup.
func joinManager(tokenURL, clientID string) (m *tokens.Manager, key string, err error) {
	key = managerKey(tokenURL, clientID)
	val, _, err := managers.LoadOrNew(key, func() (caddy.Destructor, error) {
		return tokens.NewManager(tokenURL, clientID, clk), nil
	})
	if err != nil {
		return nil, "", err
	}
	return val.(*tokens.Manager), key, nil
}

// leaveManager releases a hold taken by joinManager ("" = none taken).
func leaveManager(key string) error {
	if key == "" {
		return nil
	}
	_, err := managers.Delete(key)
	return err
}

// joinConfiguredManager is joinManager for a module's token_url option:
// resolved, and checked as the fortnox handler checks it (an http:// one
// only on loopback), so that no module sends the client secret or a
// refresh token where the fortnox handler would not.
func joinConfiguredManager(repl *caddy.Replacer, rawTokenURL, clientID string) (*tokens.Manager, string, error) {
	tokenURL := resolveTokenURL(repl, rawTokenURL)
	if err := checkTokenURL(tokenURL); err != nil {
		return nil, "", err
	}
	return joinManager(tokenURL, clientID)
}
