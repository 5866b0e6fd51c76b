package redisstate

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/ratelimit"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/redis/go-redis/v9"
)

// Limiter is the rate budget of a cluster of sidecars: one
// reservation log per (client id, tenant) in Redis, updated by one atomic
// script per request. Its semantics are the in-process limiter's: each
// request reserves the earliest time the window allows after every earlier
// reservation (arrival order), then sleeps until then; a wait past
// max_wait is refused at once and reserves nothing.
//
// While Redis cannot be reached, the in-process limiter (local) takes
// over, admitting this sidecar's share: floor(limit ÷ the sidecars seen in
// the last minute) per window per tenant, at least 1 (Conn.Sidecars, the
// last count the registry gave); it starts only once the turns Redis gave
// before the outage are out of the window (outageGate). The log reaches
// replicas but is not persisted (see turnScript), so after a Redis restart
// it has forgotten the turns of the last window (a failover to a replica
// that lagged, the last few); and while Redis was down, the sidecars'
// turns did not reach it. So for a window (and a probe interval,
// for the other sidecars to notice too) after Redis becomes reachable
// again, or after the Conn is made, a turn needs both: one of the share
// in process, then one of the script (which records it for the others).
// Across the end of an outage each sidecar then keeps to its share for
// every window, and once the script is trusted alone, its log holds every
// turn of the last window.
//
// Times are Redis's clock (TIME, read inside the script), not the
// sidecars': a pod whose clock is off, or a sidecar held up between
// reading its clock and the script running, cannot reserve a turn in the
// past and so admit a 26th request inside Fortnox's window. A sidecar
// only learns how long to wait, and sleeps that long from the answer.
type Limiter struct {
	c      *Conn
	limit  int
	window time.Duration // with the margin
	local  *ratelimit.Limiter
	gate   outageGate
	// lastLocal is when (c.clock, unix ns) the latest turn taken in
	// process alone (Redis down) left: the script's log never saw it.
	lastLocal atomic.Int64
}

// NewLimiter is the rate budget of limit requests per window (its margin
// included) shared through c; local keeps it while Redis cannot be
// reached.
func NewLimiter(c *Conn, limit int, window time.Duration, local *ratelimit.Limiter) *Limiter {
	return &Limiter{c: c, limit: limit, window: window, local: local}
}

// redisNow starts a script with `now`, Redis's clock in milliseconds.
const redisNow = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)`

// turnScript reserves a turn: KEYS[1] the reservation log (the reserved
// times, oldest first, of which the last `limit` count), KEYS[2] the pause
// (after a 429), KEYS[3] (optional) the tenant's generation; ARGV window,
// limit, max wait (milliseconds). Now is Redis's clock. It answers {slot,
// wait, generation}, or {-1, wait, generation} when the wait would be too
// long (generation 0 when there is no KEYS[3] or no such key), so that a
// sidecar can learn of a newer generation without a round trip of its own.
//
// Its writes reach the replicas but stay out of Redis's append-only file:
// a replica that a failover promotes holds the last window's turns, so a
// sidecar that did not even notice the failover keeps to the window; but
// with appendfsync always, which the refresh tokens need, each request
// would wait for an fsync (measured: b/a throughput 0.56 instead of 0.76,
// see docs/performance.md), and a restart that forgets the log costs no
// more than an outage: every sidecar notices it and keeps to its share for
// a window after (see Limiter).
//
// It runs 3 commands per request: TIME, one MGET of the log, the pause and
// the generation, and one SET of the log with its time to live. (Each
// redis.call costs Redis about as much as a bare EVALSHA's own work, see
// docs/performance.md: the first version ran 8, a list-based one 5.) The
// log is one string of the last `limit` reserved times, 13 digits each
// (milliseconds), oldest first: the latest turn is its last 13 characters,
// and the turn the next one must be a window after is the first of the
// last `limit`. The SET keeps it a window and a second past the turn it
// adds, which is the latest, so the log outlives every turn by a window.
var turnScript = redis.NewScript(TurnScriptSource)

// FirstTurnScriptSource is the turn script before the rewrites that made
// it cheaper (8 commands a request: TIME, GET, LLEN, two LINDEX, RPUSH,
// LTRIM, PEXPIRE, on a list). It runs nowhere in production: the
// limiter's tests check the current script against the same model of the
// window turn for turn, and test/bench measures both. (The two cannot
// share a log: the current one is a string under the hash-tagged key,
// which no sidecar before it used, see keys.go.)
const FirstTurnScriptSource = redisNow + `
redis.set_repl(redis.REPL_NONE)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local maxwait = tonumber(ARGV[3])
local slot = now
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
if pause > slot then slot = pause end
local n = redis.call('LLEN', KEYS[1])
if n >= limit then
	local oldest = tonumber(redis.call('LINDEX', KEYS[1], n - limit))
	if oldest + window > slot then slot = oldest + window end
end
if n > 0 then
	local last = tonumber(redis.call('LINDEX', KEYS[1], -1))
	if last > slot then slot = last end
end
local wait = slot - now
if wait > maxwait then return {-1, wait} end
redis.call('RPUSH', KEYS[1], slot)
redis.call('LTRIM', KEYS[1], -limit, -1)
redis.call('PEXPIRE', KEYS[1], wait + window + 1000)
return {slot, wait}`

// TurnScriptSource is turnScript's Lua (test/bench measures it).
const TurnScriptSource = redisNow + `
redis.set_repl(redis.REPL_REPLICA)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local maxwait = tonumber(ARGV[3])
local v
if KEYS[3] then
	v = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3])
else
	v = redis.call('MGET', KEYS[1], KEYS[2])
end
local log = v[1] or ''
local slot = now
local pause = tonumber(v[2] or 0) or 0
if pause > slot then slot = pause end
local n = math.floor(#log / 13)
if n > 0 then
	local last = tonumber(string.sub(log, -13))
	if last > slot then slot = last end
	if n >= limit then
		local i = (n - limit) * 13
		local oldest = tonumber(string.sub(log, i + 1, i + 13)) + window
		if oldest > slot then slot = oldest end
	end
end
local gen = tonumber(v[3] or 0) or 0
local wait = slot - now
if wait > maxwait then return {-1, wait, gen} end
if n >= limit then log = string.sub(log, (n - limit + 1) * 13 + 1) end
redis.call('SET', KEYS[1], log .. string.format('%013d', slot), 'PX', wait + window + 1000)
return {slot, wait, gen}`

// pauseScript moves the pause (Redis's clock + ARGV[1] milliseconds)
// later, never earlier; ARGV[2] is the key's time to live.
var pauseScript = redis.NewScript(redisNow + `
local pause_until = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause_until > cur then redis.call('SET', KEYS[1], pause_until, 'PX', ARGV[2]) end
return 0`)

// keys are a tenant's reservation log, its pause and its generation
// (read with each turn, bumped by each event: generation.go).
func (l *Limiter) keys(key string) []string {
	base := TurnsKey(l.c.owner.ClientID(), key)
	return []string{base, base + ":pause", base + ":generation"}
}

func (l *Limiter) Wait(ctx context.Context, key string, maxWait time.Duration) (time.Duration, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	l.gate.noteMaxWait(maxWait)
	if deadline, ok := ctx.Deadline(); ok {
		maxWait = min(maxWait, time.Until(deadline))
	}
	start := l.c.clock.Now()
	// Each turn is taken as late as it can be: the time it records is
	// the time the request leaves, or a later turn could count it out of
	// the window too soon.
	//   - Redis trusted alone: the script's turn.
	//   - The window after Redis came back (or the Conn was made): the
	//     share's turn, then the script's, which records when it leaves.
	//   - Redis down: the script first (it fails at once; a probe in the
	//     background finds out when Redis is back), then the share's
	//     turn.
	down := l.c.Down()
	shareFirst := !down && !l.trusts(start)
	var waited time.Duration // for the share's turn
	if shareFirst {
		var err error
		l.holdShare(key)
		if waited, err = l.local.WaitAtMost(ctx, key, maxWait, l.Share()); err != nil {
			return waited, err
		}
		maxWait = max(0, maxWait-waited)
	}
	var res []int64
	err := l.c.call(ctx, "rate limit", func(cctx context.Context) error {
		var err error
		res, err = turnScript.Run(cctx, l.c.client, l.keys(key),
			l.window.Milliseconds(), l.limit, maxWait.Milliseconds()).Int64Slice()
		return err
	})
	if err != nil || len(res) < 3 {
		if shareFirst {
			// The share's turn is taken; ctx ended, or Redis went down.
			return waited, ctx.Err()
		}
		l.holdShare(key)
		waited, err := l.local.WaitAtMost(ctx, key, maxWait, l.Share())
		if err == nil {
			raise(&l.lastLocal, l.c.clock.Now().UnixNano())
		}
		return waited, err
	}
	need := time.Duration(res[1]) * time.Millisecond
	if res[0] < 0 {
		// (A share's turn taken first stays taken: it only makes the
		// window stricter.)
		return 0, &ratelimit.Error{RetryAfter: need}
	}
	l.c.turnSaw(key, res[2])
	l.gate.noteTurn(key, l.c.clock.Now(), need)
	if need > 0 {
		t := time.NewTimer(need)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return l.c.clock.Now().Sub(start), ctx.Err() // the turn stays taken, as in process
		case <-t.C:
		}
	}
	if down {
		// This call found Redis back: the share holds for a window yet.
		l.holdShare(key)
		if _, err := l.local.WaitAtMost(ctx, key, max(0, maxWait-need), l.Share()); err != nil {
			return l.c.clock.Now().Sub(start), err
		}
	}
	if need <= 0 && waited == 0 && !down {
		return 0, nil
	}
	return l.c.clock.Now().Sub(start), nil
}

// holdShare pauses the in-process share of key, once per outage, until
// the turns Redis may have given before it are out of the window (see
// outageGate).
func (l *Limiter) holdShare(key string) {
	if d := l.gate.hold(key, l.c.downSince.Load(), l.c.clock.Now(), l.window); d > 0 {
		l.local.Penalize(key, d)
	}
}

// Share is what this sidecar may admit per window per tenant while Redis
// cannot be trusted alone: floor(limit ÷ the sidecars seen in the last
// minute), at least 1.
func (l *Limiter) Share() int {
	return max(1, l.limit/l.c.Sidecars())
}

// trusts reports whether the script's counts are trusted alone at now:
// Redis is up, and has been for a window and a probe interval (by then
// every sidecar with requests has noticed it is back, and the log holds
// the last window's turns of all of them), and this sidecar's last turn
// taken in process alone (which the log never saw; held by outageGate, it
// may leave after Redis is back) is a window and a probe interval old.
func (l *Limiter) trusts(now time.Time) bool {
	if l.c.Down() {
		return false
	}
	since := max(l.c.upSince.Load(), l.lastLocal.Load())
	return now.Sub(time.Unix(0, since)) >= l.window+outageProbeEvery
}

func (l *Limiter) Penalize(key string, d time.Duration) {
	l.local.Penalize(key, d)
	ctx, cancel := context.WithTimeout(context.Background(), tokens.SharedCallLimit)
	defer cancel()
	_ = l.c.call(ctx, "rate limit pause", func(ctx context.Context) error {
		return pauseScript.Run(ctx, l.c.client, l.keys(key)[1:2], d.Milliseconds(), (d + time.Second).Milliseconds()).Err()
	})
}

var _ ratelimit.Waiter = (*Limiter)(nil)
