package redisstate

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/redis/go-redis/v9"
)

// Notes keeps claims and pending events in Redis (cluster mode), all
// under one hash tag per client id:
//
//	caddy-fortnox:notify:{fortnox/<client_id>/}:due         sorted set: event id -> due time (ms); a lease moves it
//	caddy-fortnox:notify:{fortnox/<client_id>/}:event:<id>  an event not delivered yet
//	caddy-fortnox:notify:{fortnox/<client_id>/}:claim:<key> the state the app was last told of
type Notes struct {
	c *Conn
}

func (r *Notes) prefix() string {
	return RedisKeyPrefix + "notify:{" + tokens.RecordPrefix(r.c.owner.ClientID()) + "}:"
}

func (r *Notes) dueKey() string            { return r.prefix() + "due" }
func (r *Notes) eventKey(id string) string { return r.prefix() + "event:" + id }
func (r *Notes) claimKey(key string) string {
	return r.prefix() + "claim:" + key
}

// claimScript records a claim's state and queues the event, only when the
// state changed: KEYS claim, due, event; ARGV state, claim ttl ms, event,
// id, due ms, event ttl ms.
var claimScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
return 1`)

// takeScript leases the due events: their due time moves to the lease's
// end, so that no other sidecar takes them meanwhile. KEYS due; ARGV now
// ms, lease end ms, max, event key prefix.
var takeScript = redis.NewScript(`
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
	local v = redis.call('GET', ARGV[4] .. id)
	if v then
		redis.call('ZADD', KEYS[1], ARGV[2], id)
		table.insert(out, v)
	else
		redis.call('ZREM', KEYS[1], id)
	end
end
return out`)

func (r *Notes) Enqueue(ctx context.Context, claim *tokens.NotifyClaim, ev *tokens.PendingEvent) (bool, error) {
	raw, err := json.Marshal(ev)
	if err != nil {
		return false, err
	}
	var stored bool
	err = r.c.call(ctx, "notification", func(ctx context.Context) error {
		if claim == nil {
			_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Set(ctx, r.eventKey(ev.ID), raw, tokens.NotifyEventTTL)
				p.ZAdd(ctx, r.dueKey(), redis.Z{Score: float64(ev.NextAt.UnixMilli()), Member: ev.ID})
				return nil
			})
			stored = err == nil
			return err
		}
		n, err := claimScript.Run(ctx, r.c.client, []string{r.claimKey(claim.Key), r.dueKey(), r.eventKey(ev.ID)},
			claim.State, tokens.NotifyClaimMemory.Milliseconds(), raw, ev.ID, ev.NextAt.UnixMilli(), tokens.NotifyEventTTL.Milliseconds()).Int()
		stored = n == 1
		return err
	})
	return stored, err
}

func (r *Notes) Release(ctx context.Context, key string) error {
	return r.c.call(ctx, "notification claim", func(ctx context.Context) error {
		return r.c.client.Del(ctx, r.claimKey(key)).Err()
	})
}

func (r *Notes) Take(ctx context.Context, n, until time.Time, max int) ([]*tokens.PendingEvent, error) {
	var raws []string
	err := r.c.call(ctx, "notifications due", func(ctx context.Context) error {
		var err error
		raws, err = takeScript.Run(ctx, r.c.client, []string{r.dueKey()}, n.UnixMilli(), until.UnixMilli(), max, r.eventKey("")).StringSlice()
		return err
	})
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*tokens.PendingEvent
	for _, raw := range raws {
		var ev tokens.PendingEvent
		if json.Unmarshal([]byte(raw), &ev) == nil && tokens.ValidNotificationID(ev.ID) && ev.Body != "" {
			out = append(out, &ev)
		}
	}
	return out, nil
}

func (r *Notes) Done(ctx context.Context, ev *tokens.PendingEvent) error {
	return r.c.call(ctx, "notification done", func(ctx context.Context) error {
		_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Del(ctx, r.eventKey(ev.ID))
			p.ZRem(ctx, r.dueKey(), ev.ID)
			return nil
		})
		return err
	})
}

func (r *Notes) Later(ctx context.Context, ev *tokens.PendingEvent) error {
	raw, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	ttl := max(ev.CreatedAt.Add(tokens.NotifyEventTTL).Sub(r.c.clock.Now()), time.Minute)
	return r.c.call(ctx, "notification retry", func(ctx context.Context) error {
		_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Set(ctx, r.eventKey(ev.ID), raw, ttl)
			p.ZAdd(ctx, r.dueKey(), redis.Z{Score: float64(ev.NextAt.UnixMilli()), Member: ev.ID})
			return nil
		})
		return err
	})
}
