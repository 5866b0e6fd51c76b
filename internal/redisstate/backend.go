package redisstate

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Backend is the seam to a cluster of sidecars through Redis. Every
// call is bounded in time (sharedCallLimit). When Redis cannot be reached,
// each guard falls back to this process's own (local), so a sidecar keeps
// serving; what must never happen without Redis (a refresh token used
// without the cluster's lock) fails instead, in the record store.
type Backend struct {
	c     *Conn
	local *tokens.LocalBackend
	// generations are the tenants' generations seen (generation.go).
	generations generations
}

func newRedisShared(c *Conn) *Backend {
	return &Backend{c: c, local: tokens.NewLocalBackend(c.clock)}
}

func (r *Backend) clientKey(kind string) string {
	return RedisKeyPrefix + kind + ":" + tokens.RecordPrefix(r.c.owner.ClientID())
}

// tenantKey is one of a (client id, tenant)'s keys (keys.go): all of them
// carry the tenant's hash tag.
func (r *Backend) tenantKey(kind, tenant string) string {
	return RedisKeyPrefix + kind + ":" + TenantTag(r.c.owner.ClientID(), tenant)
}

func (r *Backend) tokenKey(subj tokens.Subject) string { return TokenKey(r.c.owner.ClientID(), subj) }
func (r *Backend) channel() string                     { return r.clientKey("events") }

// records is the store's encoder: shared tokens are encrypted like records.
func (r *Backend) records() *tokens.Records { return r.c.owner.Codec() }

func (r *Backend) LoadToken(ctx context.Context, subj tokens.Subject) (*tokens.SharedToken, error) {
	key := r.tokenKey(subj)
	var raw string
	err := r.c.call(ctx, "load token", func(ctx context.Context) error {
		var err error
		raw, err = r.c.client.HGet(ctx, key, "data").Result()
		return err
	})
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	plain, err := r.records().Plain(key, []byte(raw))
	if err != nil {
		return nil, err
	}
	var t tokens.SharedToken
	if err := json.Unmarshal(plain, &t); err != nil || t.AccessToken == "" {
		return nil, errors.New("the shared token at " + key + " is damaged")
	}
	return &t, nil
}

func (r *Backend) StoreToken(ctx context.Context, subj tokens.Subject, t *tokens.SharedToken) error {
	key := r.tokenKey(subj)
	raw, err := r.records().Encode(key, t)
	if err != nil {
		return err
	}
	return r.c.call(ctx, "store token", func(ctx context.Context) error {
		_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.HSet(ctx, key, "data", raw, "hash", tokens.TokenHash(t.AccessToken))
			p.PExpireAt(ctx, key, t.ExpiresAt)
			return nil
		})
		return err
	})
}

// dropScript deletes a shared token only if it is still the one named.
var dropScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'hash') == ARGV[1] then
	return redis.call('DEL', KEYS[1])
end
return 0`)

func (r *Backend) DropToken(ctx context.Context, subj tokens.Subject, accessToken string) error {
	hash := tokens.TokenHash(accessToken)
	err := r.c.call(ctx, "drop token", func(ctx context.Context) error {
		return dropScript.Run(ctx, r.c.client, []string{r.tokenKey(subj)}, hash).Err()
	})
	perr := r.Publish(ctx, tokens.Event{Kind: tokens.EventInvalidate, Tenant: subj.Tenant, Account: subj.Account, TokenHash: hash})
	return errors.Join(err, perr)
}

func (r *Backend) LockToken(ctx context.Context, subj tokens.Subject) (func(), error) {
	name := tokens.LockName(r.c.owner.ClientID(), subj) + "/token"
	if err := r.c.records.Lock(ctx, name); err != nil {
		return nil, err
	}
	return func() {
		uctx, cancel := context.WithTimeout(context.Background(), tokens.SharedCallLimit)
		defer cancel()
		_ = r.c.records.Unlock(uctx, name)
	}, nil
}

func (r *Backend) Publish(ctx context.Context, ev tokens.Event) error {
	ev.Origin = r.c.origin
	if ev.At.IsZero() {
		ev.At = r.c.clock.Now().UTC()
	}
	msg, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	// The tenant's generation moves with the event, in the same round
	// trip: a sidecar that misses the message sees it on its next turn
	// (generation.go).
	gkey := generationKey(r.c, ev.Tenant)
	return r.c.call(ctx, "publish", func(ctx context.Context) error {
		var gen *redis.IntCmd
		_, err := r.c.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			gen = p.Incr(ctx, gkey)
			p.PExpire(ctx, gkey, eventMemory)
			p.Publish(ctx, r.channel(), msg)
			return nil
		})
		if err == nil {
			r.generations.bumped(ev.Tenant, gen.Val())
		}
		return err
	})
}

// unavailable reports whether a call's error means Redis could not be
// reached, when this sidecar's in-process state stands in. Any other error
// (the caller gave up: Conn.call answers its context's error) is the
// caller's answer, and nothing is done in process for it.
func unavailable(err error) bool { return errors.Is(err, tokens.ErrSharedUnavailable) }

func (r *Backend) FirstUse(ctx context.Context, name string, ttl time.Duration) (bool, error) {
	var fresh bool
	err := r.c.call(ctx, "first use", func(ctx context.Context) error {
		var err error
		fresh, err = r.c.client.SetNX(ctx, r.clientKey("used")+name, 1, ttl).Result()
		return err
	})
	if unavailable(err) {
		return r.local.FirstUse(ctx, name, ttl)
	}
	return fresh, err
}

func (r *Backend) KeepResult(ctx context.Context, name, result string, ttl time.Duration) error {
	err := r.c.call(ctx, "keep connect result", func(ctx context.Context) error {
		return r.c.client.Set(ctx, r.clientKey("result")+name, result, ttl).Err()
	})
	if unavailable(err) {
		return r.local.KeepResult(ctx, name, result, ttl)
	}
	return err
}

func (r *Backend) FlowResult(ctx context.Context, name string) (string, error) {
	var result string
	err := r.c.call(ctx, "read connect result", func(ctx context.Context) error {
		v, err := r.c.client.Get(ctx, r.clientKey("result")+name).Result()
		if errors.Is(err, redis.Nil) {
			return nil
		}
		result = v
		return err
	})
	if unavailable(err) || (err == nil && result == "") {
		return r.local.FlowResult(ctx, name)
	}
	return result, err
}

// newerScript remembers the newest event time of a tenant (unix ns, as a
// decimal string). It compares the strings, not numbers: Lua's numbers are
// doubles, which cannot tell stamps some 256 ns apart. Without leading
// zeros, the longer string is the larger number.
var newerScript = redis.NewScript(`
local last = redis.call('GET', KEYS[1])
if last and (#last > #ARGV[1] or (#last == #ARGV[1] and last >= ARGV[1])) then
	return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1`)

// eventMemory: how long the newest event time of a tenant is remembered.
const eventMemory = 90 * 24 * time.Hour

func (r *Backend) NewerEvent(ctx context.Context, tenant string, at time.Time) (bool, error) {
	var newer bool
	err := r.c.call(ctx, "event order", func(ctx context.Context) error {
		n, err := newerScript.Run(ctx, r.c.client, []string{r.tenantKey("event", tenant)},
			at.UnixNano(), eventMemory.Milliseconds()).Int()
		newer = n == 1
		return err
	})
	if unavailable(err) {
		return r.local.NewerEvent(ctx, tenant, at)
	}
	return newer, err
}

// invalidationScript counts 401-invalidations in a sliding window.
var invalidationScript = redis.NewScript(`
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
	return 0
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1`)

func (r *Backend) AllowInvalidation(ctx context.Context, subj tokens.Subject, max int, window time.Duration) (bool, error) {
	var allowed bool
	err := r.c.call(ctx, "invalidation bound", func(ctx context.Context) error {
		n, err := invalidationScript.Run(ctx, r.c.client, []string{r.tenantKey("invalidations", subj.Tenant) + ":" + subj.Key()},
			r.c.clock.Now().UnixMilli(), window.Milliseconds(), max, tokens.RandomID()).Int()
		allowed = n == 1
		return err
	})
	if unavailable(err) {
		return r.local.AllowInvalidation(ctx, subj, max, window)
	}
	return allowed, err
}

// slotScript takes one of a client's token-request slots: a sorted set of
// holders by expiry, so that a dead holder's slot frees itself.
var slotScript = redis.NewScript(`
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
	return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) - tonumber(ARGV[1]))
return 1`)

func (r *Backend) TokenSlot(ctx context.Context, max int, wait time.Duration) (func(), error) {
	key := r.clientKey("slots")
	id := tokens.RandomID()
	deadline := time.Now().Add(wait)
	backoff := 5 * time.Millisecond
	queued := false
	for {
		var got bool
		err := r.c.call(ctx, "token slot", func(cctx context.Context) error {
			n := r.c.clock.Now()
			res, err := slotScript.Run(cctx, r.c.client, []string{key}, n.UnixMilli(), max,
				n.Add(tokens.RefreshCallLimit+tokens.LockBudget).UnixMilli(), id).Int()
			got = res == 1
			return err
		})
		if unavailable(err) {
			return r.local.TokenSlot(ctx, max, time.Until(deadline))
		}
		if err != nil {
			return nil, tokens.ErrStopping // the caller gave up: no slot
		}
		if got {
			return func() {
				rctx, cancel := context.WithTimeout(context.Background(), tokens.SharedCallLimit)
				defer cancel()
				_ = r.c.call(rctx, "token slot", func(ctx context.Context) error {
					return r.c.client.ZRem(ctx, key, id).Err()
				})
			}, nil
		}
		if !queued {
			queued = true
			metrics.TokenRequestsQueued.Inc()
		}
		if time.Now().Add(backoff).After(deadline) {
			return nil, errors.New("too many token requests of this client id in flight across the cluster (max_token_requests); they queued longer than token_timeout")
		}
		select {
		case <-ctx.Done():
			return nil, tokens.ErrStopping
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 50*time.Millisecond)
	}
}

// subscribe applies the other sidecars' events until the cluster is
// destroyed. After a reconnection (an outage), what was broadcast meanwhile
// is read again from the shared state.
func (c *Conn) subscribe(logger *zap.Logger) {
	ps := c.client.Subscribe(c.ctx, c.backend.channel())
	defer ps.Close()
	// The loop below ends only when ps is closed: close it when the cluster
	// is destroyed (a shutdown, a reload), or Destruct waits for ever.
	defer context.AfterFunc(c.ctx, func() { _ = ps.Close() })()
	subscriptions := 0
	for msg := range ps.ChannelWithSubscriptions(redis.WithChannelHealthCheckInterval(5 * time.Second)) {
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind != "subscribe" {
				continue
			}
			subscriptions++
			if subscriptions > 1 {
				logger.Info("subscribed to the cluster's events again: reading the shared state", zap.String("redis", c.redacted))
			}
			// Read what was broadcast while this sidecar was not
			// subscribed: it subscribes shortly after it starts (and may
			// have served tenants already), and again after an outage.
			// After an outage a command must work first: the connection
			// pool may refuse to dial for a moment after the subscription
			// is back, and ok() reads the state once a command works.
			if c.down.Load() {
				c.startProbing()
			} else {
				go c.owner.Resync()
			}
		case *redis.Message:
			var ev tokens.Event
			if err := json.Unmarshal([]byte(m.Payload), &ev); err != nil || ev.Origin == c.origin || !tokens.ValidTenantID(ev.Tenant) {
				continue
			}
			if ev.Account != "" && !tokens.ValidAccountName(ev.Account) {
				continue
			}
			c.owner.ApplyEvent(ev)
		}
	}
}

var _ tokens.Backend = (*Backend)(nil)

// Notes is where notifications are kept in cluster mode.
func (r *Backend) Notes() tokens.NotifyStore { return &Notes{c: r.c} }

// DropAnyToken removes the subject's shared token, whichever it is.
func (r *Backend) DropAnyToken(ctx context.Context, subj tokens.Subject) error {
	return r.c.call(ctx, "drop token", func(ctx context.Context) error {
		return r.c.client.Del(ctx, r.tokenKey(subj)).Err()
	})
}

// Down reports whether the connection counts Redis as down.
func (r *Backend) Down() bool { return r.c.Down() }
