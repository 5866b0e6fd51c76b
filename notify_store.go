package fortnox

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Where notifications wait: Caddy's storage without `redis`, Redis in
// cluster mode. Neither holds a token or a secret (an event names a
// tenant, an account and a reason), so they are stored in plain JSON,
// under their own prefix beside the token records.

// storageNotes keeps claims and pending events in Caddy's storage:
//
//	fortnox-notify/<client_id>/pending/<id>.json   an event not delivered yet
//	fortnox-notify/<client_id>/claims/<claim key>  the state the app was last told of
type storageNotes struct {
	storage  recordBackend
	clientID string
}

func (s *storageNotes) prefix() string {
	return "fortnox-notify/" + url.PathEscape(s.clientID) + "/"
}

func (s *storageNotes) pendingDir() string { return s.prefix() + "pending" }

func (s *storageNotes) pendingKey(id string) string { return s.pendingDir() + "/" + id + ".json" }

func (s *storageNotes) claimPath(key string) string { return s.prefix() + "claims/" + key }

func (s *storageNotes) store(ctx context.Context, ev *pendingEvent) error {
	raw, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	return s.storage.Store(ctx, s.pendingKey(ev.ID), raw)
}

func (s *storageNotes) enqueue(ctx context.Context, claim *notifyClaim, ev *pendingEvent) (bool, error) {
	if claim == nil {
		return true, s.store(ctx, ev)
	}
	path := s.claimPath(claim.key)
	if err := s.storage.Lock(ctx, path); err != nil {
		return false, err
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = s.storage.Unlock(uctx, path)
	}()
	last, err := s.storage.Load(ctx, path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return false, err
	case string(last) == claim.state:
		return false, nil
	}
	// The event first: a crash between the two writes tells the app
	// twice rather than never.
	if err := s.store(ctx, ev); err != nil {
		return false, err
	}
	return true, s.storage.Store(ctx, path, []byte(claim.state))
}

func (s *storageNotes) release(ctx context.Context, key string) error {
	err := s.storage.Delete(ctx, s.claimPath(key))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func (s *storageNotes) load(ctx context.Context, key string) (*pendingEvent, error) {
	raw, err := s.storage.Load(ctx, key)
	if err != nil {
		return nil, err
	}
	var ev pendingEvent
	if err := json.Unmarshal(raw, &ev); err != nil || !validNotificationID(ev.ID) || ev.Body == "" {
		return nil, errors.New("unreadable pending notification " + key)
	}
	return &ev, nil
}

// take reads the pending events and leases those due, each under its own
// storage lock, so that processes sharing the storage deliver each once.
func (s *storageNotes) take(ctx context.Context, n, until time.Time, max int) ([]*pendingEvent, error) {
	keys, err := s.storage.List(ctx, s.pendingDir(), false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	sort.Strings(keys)
	var out []*pendingEvent
	for _, key := range keys {
		if len(out) == max {
			break
		}
		id, ok := strings.CutSuffix(key[strings.LastIndexByte(key, '/')+1:], ".json")
		if !ok || !validNotificationID(id) {
			continue
		}
		if ev, err := s.load(ctx, key); err != nil || !dueAt(ev, n) {
			continue
		}
		ev, err := s.lease(ctx, key, n, until)
		if err != nil {
			return out, err
		}
		if ev != nil {
			out = append(out, ev)
		}
	}
	return out, nil
}

func dueAt(ev *pendingEvent, n time.Time) bool {
	return !n.Before(ev.NextAt) && !n.Before(ev.LeaseUntil)
}

// lease takes one event under its lock: nil when another took it first.
func (s *storageNotes) lease(ctx context.Context, key string, n, until time.Time) (*pendingEvent, error) {
	if err := s.storage.Lock(ctx, key); err != nil {
		return nil, err
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = s.storage.Unlock(uctx, key)
	}()
	ev, err := s.load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil || !dueAt(ev, n) {
		return nil, nil
	}
	ev.LeaseUntil = until
	if err := s.store(ctx, ev); err != nil {
		return nil, err
	}
	return ev, nil
}

func (s *storageNotes) done(ctx context.Context, ev *pendingEvent) error {
	err := s.storage.Delete(ctx, s.pendingKey(ev.ID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func (s *storageNotes) later(ctx context.Context, ev *pendingEvent) error {
	return s.store(ctx, ev)
}

// redisNotes keeps claims and pending events in Redis (cluster mode), all
// under one hash tag per client id:
//
//	caddy-fortnox:notify:{fortnox/<client_id>/}:due         sorted set: event id -> due time (ms); a lease moves it
//	caddy-fortnox:notify:{fortnox/<client_id>/}:event:<id>  an event not delivered yet
//	caddy-fortnox:notify:{fortnox/<client_id>/}:claim:<key> the state the app was last told of
type redisNotes struct {
	c *redisCluster
}

func (r *redisNotes) prefix() string {
	return redisKeyPrefix + "notify:{" + recordPrefix(r.c.owner.ClientID()) + "}:"
}

func (r *redisNotes) dueKey() string            { return r.prefix() + "due" }
func (r *redisNotes) eventKey(id string) string { return r.prefix() + "event:" + id }
func (r *redisNotes) claimKey(key string) string {
	return r.prefix() + "claim:" + key
}

// notifyEventTTL: an event the store keeps outlives the day it is tried.
const notifyEventTTL = notifyGiveUp + time.Hour

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

func (r *redisNotes) enqueue(ctx context.Context, claim *notifyClaim, ev *pendingEvent) (bool, error) {
	raw, err := json.Marshal(ev)
	if err != nil {
		return false, err
	}
	var stored bool
	err = r.c.call(ctx, "notification", func(ctx context.Context) error {
		if claim == nil {
			_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Set(ctx, r.eventKey(ev.ID), raw, notifyEventTTL)
				p.ZAdd(ctx, r.dueKey(), redis.Z{Score: float64(ev.NextAt.UnixMilli()), Member: ev.ID})
				return nil
			})
			stored = err == nil
			return err
		}
		n, err := claimScript.Run(ctx, r.c.client, []string{r.claimKey(claim.key), r.dueKey(), r.eventKey(ev.ID)},
			claim.state, notifyClaimMemory.Milliseconds(), raw, ev.ID, ev.NextAt.UnixMilli(), notifyEventTTL.Milliseconds()).Int()
		stored = n == 1
		return err
	})
	return stored, err
}

func (r *redisNotes) release(ctx context.Context, key string) error {
	return r.c.call(ctx, "notification claim", func(ctx context.Context) error {
		return r.c.client.Del(ctx, r.claimKey(key)).Err()
	})
}

func (r *redisNotes) take(ctx context.Context, n, until time.Time, max int) ([]*pendingEvent, error) {
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
	var out []*pendingEvent
	for _, raw := range raws {
		var ev pendingEvent
		if json.Unmarshal([]byte(raw), &ev) == nil && validNotificationID(ev.ID) && ev.Body != "" {
			out = append(out, &ev)
		}
	}
	return out, nil
}

func (r *redisNotes) done(ctx context.Context, ev *pendingEvent) error {
	return r.c.call(ctx, "notification done", func(ctx context.Context) error {
		_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Del(ctx, r.eventKey(ev.ID))
			p.ZRem(ctx, r.dueKey(), ev.ID)
			return nil
		})
		return err
	})
}

func (r *redisNotes) later(ctx context.Context, ev *pendingEvent) error {
	raw, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	ttl := max(ev.CreatedAt.Add(notifyEventTTL).Sub(clk.Now()), time.Minute)
	return r.c.call(ctx, "notification retry", func(ctx context.Context) error {
		_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Set(ctx, r.eventKey(ev.ID), raw, ttl)
			p.ZAdd(ctx, r.dueKey(), redis.Z{Score: float64(ev.NextAt.UnixMilli()), Member: ev.ID})
			return nil
		})
		return err
	})
}

var (
	_ notifyStore = (*storageNotes)(nil)
	_ notifyStore = (*redisNotes)(nil)
)
