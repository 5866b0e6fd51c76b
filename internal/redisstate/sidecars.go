package redisstate

import (
	"context"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/redis/go-redis/v9"
)

// The registry of live sidecars: each Conn (one per sidecar process and
// client id) writes its origin into one sorted set per client id, scored
// by Redis's clock, every heartbeatEvery, and reads at the same time how
// many members were seen within sidecarSeenFor (older ones are trimmed).
// It keeps the larger of the last two counts it read: while Redis cannot be reached, each
// sidecar keeps to floor(limit ÷ that count) of the rate budget (see
// Limiter).
//
// Variables so that tests can shorten them (set before New).
var (
	heartbeatEvery = 5 * time.Second
	sidecarSeenFor = time.Minute
)

// heartbeatScript registers ARGV[1] in the set KEYS[1] at Redis's clock,
// drops the members not seen for ARGV[2] milliseconds and answers how many
// are left (itself included). A member is its Conn's origin, so a sidecar
// is counted once however often it beats. The set is replicated and
// persisted like any write: after a failover or restart the registry is
// still there (one write per sidecar every few seconds costs little).
var heartbeatScript = redis.NewScript(redisNow + `
local seen = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - seen))
local n = redis.call('ZCOUNT', KEYS[1], now - seen, '+inf')
redis.call('PEXPIRE', KEYS[1], 2 * seen)
return n`)

// sidecarsKey is the client id's registry, named like the other
// client-wide keys (Backend.clientKey).
func (c *Conn) sidecarsKey() string {
	return RedisKeyPrefix + "sidecars:" + tokens.RecordPrefix(c.owner.ClientID())
}

// Sidecars is the number of sidecars of this client id seen within the
// last minute, the larger of the last two counts read from Redis (at
// least 1: this one). It keeps its value while Redis cannot be reached.
func (c *Conn) Sidecars() int {
	return int(max(1, c.sidecars.Load()))
}

// heartbeat registers this sidecar and reads how many there are; on
// failure (an outage, noted by call) the last count stays.
func (c *Conn) heartbeat(ctx context.Context) {
	var n int64
	err := c.call(ctx, "sidecar heartbeat", func(ctx context.Context) error {
		var err error
		n, err = heartbeatScript.Run(ctx, c.client, []string{c.sidecarsKey()},
			c.origin, sidecarSeenFor.Milliseconds()).Int64()
		return err
	})
	if err == nil {
		c.registered.Store(true)
		// The larger of this count and the one before: a registry that
		// Redis lost (a restart without its data, a failover to a replica
		// behind) is whole again only once every live sidecar has beaten,
		// within heartbeatEvery, so a count read just after would be too
		// small. A sidecar that left is dropped one beat later.
		prev := c.lastCount.Swap(n)
		c.sidecars.Store(max(1, n, prev))
	}
}

// beat heartbeats every heartbeatEvery until the Conn is destroyed, the
// first time shortly after it is made (not at once: `caddy validate`
// provisions and cleans up right away, and must not touch the network).
func (c *Conn) beat() {
	defer c.background.Done()
	wait := 300 * time.Millisecond
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = heartbeatEvery
		c.heartbeat(c.ctx)
	}
}

// unregister takes this sidecar out of the registry when its Conn is
// destroyed (a reload that replaced it, or a graceful stop), so that the
// next Conn of this process is not counted beside it for a minute. Bounded;
// skipped if it never registered (`caddy validate`) or Redis is down (the
// entry then ages out within a minute, which only makes the others' share
// smaller meanwhile).
func (c *Conn) unregister() {
	if !c.registered.Load() || c.down.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), tokens.SharedCallLimit)
	defer cancel()
	_ = c.call(ctx, "sidecar unregister", func(ctx context.Context) error {
		return c.client.ZRem(ctx, c.sidecarsKey(), c.origin).Err()
	})
}
