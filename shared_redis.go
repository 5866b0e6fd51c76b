package fortnox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// redisShared is the seam to a cluster of sidecars through Redis. Every
// call is bounded in time (sharedCallLimit). When Redis cannot be reached,
// each guard falls back to this process's own (local), so a sidecar keeps
// serving; what must never happen without Redis (a refresh token used
// without the cluster's lock) fails instead, in the record store.
type redisShared struct {
	c     *redisCluster
	local *localShared
}

func newRedisShared(c *redisCluster) *redisShared {
	return &redisShared{c: c, local: newLocalShared()}
}

func (r *redisShared) clientKey(kind string) string {
	return redisKeyPrefix + kind + ":" + recordPrefix(r.c.owner.ClientID())
}

func (r *redisShared) tokenKey(subj subject) string { return r.clientKey("token") + subj.key() }
func (r *redisShared) channel() string              { return r.clientKey("events") }

// records is the store's encoder: shared tokens are encrypted like records.
func (r *redisShared) records() *recordStore { return r.c.owner.Codec() }

func (r *redisShared) loadToken(ctx context.Context, subj subject) (*sharedToken, error) {
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
	plain, err := r.records().plain(key, []byte(raw))
	if err != nil {
		return nil, err
	}
	var t sharedToken
	if err := json.Unmarshal(plain, &t); err != nil || t.AccessToken == "" {
		return nil, errors.New("the shared token at " + key + " is damaged")
	}
	return &t, nil
}

func (r *redisShared) storeToken(ctx context.Context, subj subject, t *sharedToken) error {
	key := r.tokenKey(subj)
	raw, err := r.records().encode(key, t)
	if err != nil {
		return err
	}
	return r.c.call(ctx, "store token", func(ctx context.Context) error {
		_, err := r.c.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.HSet(ctx, key, "data", raw, "hash", tokenHash(t.AccessToken))
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

func (r *redisShared) dropToken(ctx context.Context, subj subject, accessToken string) error {
	hash := tokenHash(accessToken)
	err := r.c.call(ctx, "drop token", func(ctx context.Context) error {
		return dropScript.Run(ctx, r.c.client, []string{r.tokenKey(subj)}, hash).Err()
	})
	perr := r.publish(ctx, event{Kind: eventInvalidate, Tenant: subj.tenant, Account: subj.account, TokenHash: hash})
	return errors.Join(err, perr)
}

func (r *redisShared) lockToken(ctx context.Context, subj subject) (func(), error) {
	name := lockName(r.c.owner.ClientID(), subj) + "/token"
	if err := r.c.records.Lock(ctx, name); err != nil {
		return nil, err
	}
	return func() {
		uctx, cancel := context.WithTimeout(context.Background(), sharedCallLimit)
		defer cancel()
		_ = r.c.records.Unlock(uctx, name)
	}, nil
}

func (r *redisShared) publish(ctx context.Context, ev event) error {
	ev.Origin = r.c.origin
	if ev.At.IsZero() {
		ev.At = clk.Now().UTC()
	}
	msg, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	return r.c.call(ctx, "publish", func(ctx context.Context) error {
		return r.c.client.Publish(ctx, r.channel(), msg).Err()
	})
}

func (r *redisShared) firstUse(ctx context.Context, name string, ttl time.Duration) (bool, error) {
	var fresh bool
	err := r.c.call(ctx, "first use", func(ctx context.Context) error {
		var err error
		fresh, err = r.c.client.SetNX(ctx, r.clientKey("used")+name, 1, ttl).Result()
		return err
	})
	if err != nil {
		return r.local.firstUse(ctx, name, ttl)
	}
	return fresh, nil
}

func (r *redisShared) keepResult(ctx context.Context, name, result string, ttl time.Duration) error {
	err := r.c.call(ctx, "keep connect result", func(ctx context.Context) error {
		return r.c.client.Set(ctx, r.clientKey("result")+name, result, ttl).Err()
	})
	if err != nil {
		return r.local.keepResult(ctx, name, result, ttl)
	}
	return nil
}

func (r *redisShared) flowResult(ctx context.Context, name string) (string, error) {
	var result string
	err := r.c.call(ctx, "read connect result", func(ctx context.Context) error {
		v, err := r.c.client.Get(ctx, r.clientKey("result")+name).Result()
		if errors.Is(err, redis.Nil) {
			return nil
		}
		result = v
		return err
	})
	if err != nil || result == "" {
		return r.local.flowResult(ctx, name)
	}
	return result, nil
}

// newerScript remembers the newest event time of a tenant.
var newerScript = redis.NewScript(`
local last = redis.call('GET', KEYS[1])
if last and tonumber(last) >= tonumber(ARGV[1]) then
	return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1`)

// eventMemory: how long the newest event time of a tenant is remembered.
const eventMemory = 90 * 24 * time.Hour

func (r *redisShared) newerEvent(ctx context.Context, tenant string, at time.Time) (bool, error) {
	var newer bool
	err := r.c.call(ctx, "event order", func(ctx context.Context) error {
		n, err := newerScript.Run(ctx, r.c.client, []string{r.clientKey("event") + tenant},
			at.UnixNano(), eventMemory.Milliseconds()).Int()
		newer = n == 1
		return err
	})
	if err != nil {
		return r.local.newerEvent(ctx, tenant, at)
	}
	return newer, nil
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

func (r *redisShared) allowInvalidation(ctx context.Context, subj subject, max int, window time.Duration) (bool, error) {
	var allowed bool
	err := r.c.call(ctx, "invalidation bound", func(ctx context.Context) error {
		n, err := invalidationScript.Run(ctx, r.c.client, []string{r.clientKey("invalidations") + subj.key()},
			clk.Now().UnixMilli(), window.Milliseconds(), max, randomID()).Int()
		allowed = n == 1
		return err
	})
	if err != nil {
		return r.local.allowInvalidation(ctx, subj, max, window)
	}
	return allowed, nil
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

func (r *redisShared) tokenSlot(ctx context.Context, max int, wait time.Duration) (func(), error) {
	key := r.clientKey("slots")
	id := randomID()
	deadline := time.Now().Add(wait)
	backoff := 5 * time.Millisecond
	queued := false
	for {
		var got bool
		err := r.c.call(ctx, "token slot", func(cctx context.Context) error {
			n := clk.Now()
			res, err := slotScript.Run(cctx, r.c.client, []string{key}, n.UnixMilli(), max,
				n.Add(refreshCallLimit+lockBudget).UnixMilli(), id).Int()
			got = res == 1
			return err
		})
		if err != nil {
			return r.local.tokenSlot(ctx, max, time.Until(deadline))
		}
		if got {
			return func() {
				rctx, cancel := context.WithTimeout(context.Background(), sharedCallLimit)
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
			return nil, errStopping
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 50*time.Millisecond)
	}
}

func randomID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// subscribe applies the other sidecars' events until the cluster is
// destroyed. After a reconnection (an outage), what was broadcast meanwhile
// is read again from the shared state.
func (c *redisCluster) subscribe(logger *zap.Logger) {
	ps := c.client.Subscribe(c.ctx, c.shared.channel())
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
				c.background.Add(1)
				go c.probeUntilUp()
			} else {
				go c.owner.resync()
			}
		case *redis.Message:
			var ev event
			if err := json.Unmarshal([]byte(m.Payload), &ev); err != nil || ev.Origin == c.origin || !validTenantID(ev.Tenant) {
				continue
			}
			if ev.Account != "" && !validAccountName(ev.Account) {
				continue
			}
			c.owner.applyEvent(ev)
		}
	}
}

// applyEvent applies another sidecar's event to this one's memory.
func (m *tokenManager) applyEvent(ev event) {
	subj := subject{tenant: ev.Tenant, account: ev.Account}
	if ce := m.logger().Check(zap.DebugLevel, "event from another sidecar"); ce != nil {
		ce.Write(append(subj.logFields(), zap.String("kind", ev.Kind))...)
	}
	switch ev.Kind {
	case eventRevoked, eventCreated:
		// Broadcasts may be read out of order: a sidecar can take a new
		// consent through its webhook before it reads another's earlier
		// revocation. The tenant's record, written before each broadcast,
		// has the latest word: an event it contradicts is stale.
		if revoked, known := m.storedRevocation(ev.Tenant); known && revoked != (ev.Kind == eventRevoked) {
			return
		}
		if ev.Kind == eventRevoked {
			m.noteRevoked(ev.Tenant)
		} else {
			m.noteCreated(ev.Tenant)
		}
		m.notifyConsent(ev.Tenant, ev.Kind) // told once, whichever sidecar claims it first
	case eventRecovered:
		m.noteRecovered(subj)
	case eventInvalidate:
		if v, ok := m.cache.Get(subj.key()); ok {
			if t := v.(*cachedToken); tokenHash(t.accessToken()) == ev.TokenHash {
				m.reject(subj, t.bearer)
				m.drop(subj, t)
			}
		}
	case eventDropped:
		m.drop(subj, nil)
	case eventForget:
		m.forget(subj)
	}
}

// storedRevocation reads whether the tenant's record marks its consent as
// revoked; known is false when there is no record or it cannot be read.
func (m *tokenManager) storedRevocation(tenant string) (revoked, known bool) {
	s := m.settings.Load()
	if s == nil || s.records == nil {
		return false, false
	}
	ctx, cancel := context.WithTimeout(m.ctx, sharedCallLimit)
	defer cancel()
	rec, err := s.records.load(ctx, subject{tenant: tenant})
	if err != nil || rec == nil {
		return false, false
	}
	return !rec.ConsentRevokedAt.IsZero(), true
}

// forget drops everything remembered in memory about a subject.
func (m *tokenManager) forget(subj subject) {
	m.mu.Lock()
	delete(m.tenants, subj.key())
	m.mu.Unlock()
	m.drop(subj, nil)
}

// resync reads the shared state again after an outage, or once subscribed:
// revocations and new consents broadcast meanwhile are read from the
// tenants' records.
func (m *tokenManager) resync() {
	s := m.settings.Load()
	m.mu.Lock()
	var tenants []string
	for key, st := range m.tenants {
		st.revocationRead = false
		if st.lastError != nil && st.lastError.failure == failStorage {
			// The store failed because Redis did: try again now, not
			// after the backoff the outage built up.
			st.retryAt, st.failures = time.Time{}, 0
		}
		if _, _, isAccount := cutAccount(key); !isAccount {
			tenants = append(tenants, key)
		}
	}
	m.mu.Unlock()
	for key := range m.cache.Items() {
		if _, _, isAccount := cutAccount(key); !isAccount {
			tenants = append(tenants, key)
		}
	}
	for _, tenant := range tenants {
		if m.revokedError(s, tenant) != nil {
			m.drop(subject{tenant: tenant}, nil)
		}
	}
}

// cutAccount splits a subject key.
func cutAccount(key string) (tenant, account string, isAccount bool) {
	for i := 0; i < len(key); i++ {
		if key[i] == '/' {
			return key[:i], key[i+1:], true
		}
	}
	return key, "", false
}

var _ sharedState = (*redisShared)(nil)

// notes is where notifications are kept in cluster mode.
func (r *redisShared) notes() notifyStore { return &redisNotes{c: r.c} }

// dropAnyToken removes the subject's shared token, whichever it is.
func (r *redisShared) dropAnyToken(ctx context.Context, subj subject) error {
	return r.c.call(ctx, "drop token", func(ctx context.Context) error {
		return r.c.client.Del(ctx, r.tokenKey(subj)).Err()
	})
}
