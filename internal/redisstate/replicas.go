package redisstate

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// replica_acks: a rotated refresh token, its in-flight mark and its lock
// count as stored only once this many replicas of the primary that took
// them have them too. The write and a WAIT run as one pipeline on one
// connection (WAIT counts the replicas that have that connection's
// writes): the primary's for one server or Sentinel, the node that owns
// the key's slot for a Cluster (ClusterClient.MasterForKey).

// replicaAcksWait is WAIT's timeout: a write whose replicas do not answer
// within it fails, well inside tokens.SharedCallLimit.
const replicaAcksWait = 500 * time.Millisecond

// replicasReadEvery: the default (the primary's connected replicas) is
// read again this often, and after any failed durable write (a failover
// names a new primary, which may have another number of replicas).
const replicasReadEvery = 5 * time.Second

// ReplicaAcksError is a write that fewer replicas acknowledged than
// replica_acks requires: it does not count as stored.
type ReplicaAcksError struct {
	Need, Got int
	Default   bool // Need is the default, not a configured replica_acks
}

func (e *ReplicaAcksError) Error() string {
	how := "replica_acks"
	if e.Default {
		how = "replica_acks (by default the primary's connected replicas)"
	}
	return fmt.Sprintf("%s %d: only %d replicas acknowledged the write within %v, so it does not count as stored", how, e.Need, e.Got, replicaAcksWait)
}

// replicas is a Conn's replica_acks: configured, or read per primary.
type replicas struct {
	configured atomic.Int64 // -1: the default
	mu         sync.Mutex
	read       map[string]replicasRead // by node ("" without a Cluster)
}

type replicasRead struct {
	n  int
	at time.Time
}

// SetReplicaAcks sets replica_acks (n < 0: the default, the current
// primary's connected replicas, at most 1). Call it before the first use.
func (c *Conn) SetReplicaAcks(n int) { c.replicas.configured.Store(int64(n)) }

// nodeFor is the client of the node that a write of key goes to, and its
// name: the client itself for one server or Sentinel (a pipeline of a
// *redis.Client runs on one connection).
func (c *Conn) nodeFor(ctx context.Context, key string) (*redis.Client, string, error) {
	switch cl := c.client.(type) {
	case *redis.ClusterClient:
		node, err := cl.MasterForKey(ctx, key)
		if err != nil {
			return nil, "", err
		}
		return node, node.Options().Addr, nil
	case *redis.Client:
		return cl, "", nil
	}
	return nil, "", fmt.Errorf("no node client for a %T", c.client)
}

// acksNeeded is how many replicas a write on node must reach: replica_acks,
// or the primary's connected replicas (at most 1), read at most
// replicasReadEvery ago.
func (c *Conn) acksNeeded(ctx context.Context, node *redis.Client, name string, fresh bool) (int, bool, error) {
	if n := c.replicas.configured.Load(); n >= 0 {
		return int(n), false, nil
	}
	c.replicas.mu.Lock()
	r, ok := c.replicas.read[name]
	c.replicas.mu.Unlock()
	if ok && !fresh && time.Since(r.at) < replicasReadEvery {
		return r.n, true, nil
	}
	info, err := node.Info(ctx, "replication").Result()
	if err != nil {
		return 0, true, err
	}
	n := 0
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "connected_slaves:"); ok {
			n, _ = strconv.Atoi(v)
		}
	}
	n = min(n, 1)
	c.replicas.mu.Lock()
	if c.replicas.read == nil {
		c.replicas.read = map[string]replicasRead{}
	}
	c.replicas.read[name] = replicasRead{n: n, at: time.Now()}
	c.replicas.mu.Unlock()
	return n, true, nil
}

// forgetReplicas makes the next durable write read the default again.
func (c *Conn) forgetReplicas() {
	c.replicas.mu.Lock()
	c.replicas.read = nil
	c.replicas.mu.Unlock()
}

// durably runs the writes that fn queues (all of key's slot) as one
// pipeline on the node that owns key, followed by WAIT for replica_acks
// replicas when that is more than 0. Fewer acknowledgements make it a
// *ReplicaAcksError. Run it inside Conn.call.
func (c *Conn) durably(ctx context.Context, key string, fn func(p redis.Pipeliner)) error {
	err := c.durablyOnce(ctx, key, fn)
	if cc, ok := c.client.(*redis.ClusterClient); ok && movedSlot(err) {
		// The slot moved (a failover, a resharding): the node client
		// does not follow redirections as the cluster client does, so
		// learn the new map and write once more, to the new owner.
		cc.ReloadState(ctx)
		err = c.durablyOnce(ctx, key, fn)
	}
	return err
}

// movedSlot reports whether err is a Cluster's redirection.
func movedSlot(err error) bool {
	if err == nil {
		return false
	}
	msg := err.Error()
	return strings.HasPrefix(msg, "MOVED ") || strings.HasPrefix(msg, "ASK ") || strings.HasPrefix(msg, "CLUSTERDOWN ")
}

func (c *Conn) durablyOnce(ctx context.Context, key string, fn func(p redis.Pipeliner)) (err error) {
	node, name, err := c.nodeFor(ctx, key)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			c.forgetReplicas()
		}
	}()
	need, byDefault, err := c.acksNeeded(ctx, node, name, false)
	if err != nil {
		return err
	}
	if need == 0 {
		// The client's own pipeline: a Cluster's follows redirections.
		_, err := c.client.Pipelined(ctx, func(p redis.Pipeliner) error { fn(p); return nil })
		return err
	}
	var wait *redis.Cmd
	if _, err := node.Pipelined(ctx, func(p redis.Pipeliner) error {
		fn(p)
		wait = p.Do(ctx, "wait", need, replicaAcksWait.Milliseconds())
		return nil
	}); err != nil {
		return err
	}
	n, _ := wait.Int()
	got := n
	if got >= need {
		return nil
	}
	if byDefault {
		// The replica may be gone for good: the default is what the
		// primary has now.
		if now, _, rerr := c.acksNeeded(ctx, node, name, true); rerr == nil && got >= now {
			return nil
		}
	}
	return &ReplicaAcksError{Need: need, Got: got, Default: byDefault}
}

// isReplicaAcks reports whether err is a replica_acks shortfall (not an
// outage: Redis answered).
func isReplicaAcks(err error) bool {
	var e *ReplicaAcksError
	return errors.As(err, &e)
}
