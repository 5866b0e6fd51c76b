package redisstate

import (
	"context"
	"errors"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// A primary with one replica that three Sentinels watch. With
// replica_acks 1 (and by default: the primary has one replica), a record
// and a lock count as stored once the replica has them. With the replica
// hung (SIGSTOP: still connected, answering nothing), a Store and a Lock
// fail within WAIT's bound with an error naming replica_acks, leave no
// lock behind, and do not count as an outage; once the replica answers
// again, they work again.
func TestReplicaAcks(t *testing.T) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatal("redis-server is not on PATH: install it (apt-get install redis-server; CI does)")
	}
	s := testproc.StartSentinel(t, testproc.SentinelConfig{DownAfter: time.Minute})
	cfg := SentinelConfig{Master: s.MasterName(), Addrs: s.SentinelAddrs()}
	conn := func(acks int) *Conn {
		opts, err := FailoverOptions(cfg)
		if err != nil {
			t.Fatal(err)
		}
		c := NewSentinel(t.Name(), shareOwner{limiterOwner{clk: clock.New()}, "acks"}, opts, RedactSentinel(cfg), zap.NewNop(), func() {})
		c.SetReplicaAcks(acks)
		t.Cleanup(func() { _ = c.Destruct() })
		return c
	}
	configured, byDefault := conn(1), conn(-1)
	key := tokens.RecordKey("acks", tokens.Subject{Tenant: "1234567"})
	lock := tokens.LockName("acks", tokens.Subject{Tenant: "1234567"})
	ctx := func() context.Context {
		c, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		t.Cleanup(cancel)
		return c
	}
	for name, c := range map[string]*Conn{"replica_acks 1": configured, "default": byDefault} {
		if err := c.Records().Store(ctx(), key, []byte("v1")); err != nil {
			t.Fatalf("%s: Store with the replica up: %v", name, err)
		}
		if err := c.Records().Lock(ctx(), lock); err != nil {
			t.Fatalf("%s: Lock with the replica up: %v", name, err)
		}
		if err := c.Records().Unlock(ctx(), lock); err != nil {
			t.Fatal(err)
		}
	}

	thaw := s.Nodes()[1].Freeze(t)
	for name, c := range map[string]*Conn{"replica_acks 1": configured, "default": byDefault} {
		start := time.Now()
		err := c.Records().Store(ctx(), key, []byte("v2"))
		took := time.Since(start)
		t.Logf("%s: Store with the replica hung failed after %v: %v", name, took.Round(time.Millisecond), err)
		var short *ReplicaAcksError
		if !errors.As(err, &short) || !strings.Contains(err.Error(), "replica_acks") {
			t.Errorf("%s: Store with the replica hung: %v, want an error naming replica_acks", name, err)
		}
		if took > 1500*time.Millisecond {
			t.Errorf("%s: Store with the replica hung took %v, want WAIT's bound (%v) and little more", name, took, replicaAcksWait)
		}
		if err := c.Records().Lock(ctx(), lock); err == nil || !strings.Contains(err.Error(), "replica_acks") {
			t.Errorf("%s: Lock with the replica hung: %v, want an error naming replica_acks", name, err)
		}
		if c.Down() {
			t.Errorf("%s: a replica_acks shortfall counted as an outage", name)
		}
	}
	// The lock that was not held durably was let go.
	if err := byDefault.Records().Lock(ctx(), lock+"-other"); err == nil {
		t.Error("a Lock succeeded with the replica hung")
	}
	thaw()
	testproc.WaitFor(t, "a Store succeeds once the replica answers", 5*time.Second, func() bool {
		return configured.Records().Store(ctx(), key, []byte("v3")) == nil
	})
	if err := configured.Records().Lock(ctx(), lock); err != nil {
		t.Errorf("Lock once the replica answers (the failed Lock left it held?): %v", err)
	}
}

// On a Redis Cluster whose primaries have one replica each, WAIT runs on
// the connection to the node that took the write: with one primary's
// replica hung, a write of a tenant on that primary fails naming
// replica_acks (a WAIT on any connection without that write would count
// the hung replica), and a write of a tenant on another primary still
// counts as stored (a WAIT sent to the first primary would not).
func TestReplicaAcksOnACluster(t *testing.T) {
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s is not on PATH: install it (apt-get install redis-server; CI does)", bin)
		}
	}
	cl := testproc.StartClusterWithReplicas(t, testproc.RedisConfig{})
	cfg := ClusterConfig{Addrs: cl.Addrs()}
	conn := func(acks int) *Conn {
		opts, err := ClusterOptions(cfg)
		if err != nil {
			t.Fatal(err)
		}
		c := NewCluster(t.Name(), shareOwner{limiterOwner{clk: clock.New()}, "acks"}, opts, RedactCluster(cfg), zap.NewNop(), func() {})
		c.SetReplicaAcks(acks)
		t.Cleanup(func() { _ = c.Destruct() })
		return c
	}
	configured, byDefault := conn(1), conn(-1)
	ctx := func() context.Context {
		c, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		t.Cleanup(cancel)
		return c
	}
	// Two tenants whose keys live on two different primaries.
	cc := configured.client.(*redis.ClusterClient)
	primaryOf := func(tenant string) string {
		node, err := cc.MasterForKey(ctx(), RecordKey(tokens.RecordKey("acks", tokens.Subject{Tenant: tenant})))
		if err != nil {
			t.Fatal(err)
		}
		return node.Options().Addr
	}
	hung, fine := "1000000", ""
	for i := 1; i < 100 && fine == ""; i++ {
		if tn := strconv.Itoa(1000000 + i); primaryOf(tn) != primaryOf(hung) {
			fine = tn
		}
	}
	if fine == "" {
		t.Fatal("100 tenants on one primary: the slots are not spread")
	}
	store := func(c *Conn, tenant, v string) error {
		return c.Records().Store(ctx(), tokens.RecordKey("acks", tokens.Subject{Tenant: tenant}), []byte(v))
	}
	for name, c := range map[string]*Conn{"replica_acks 1": configured, "default": byDefault} {
		for _, tn := range []string{hung, fine} {
			if err := store(c, tn, "v1"); err != nil {
				t.Fatalf("%s: Store of %s with every replica up: %v", name, tn, err)
			}
		}
	}
	replica := cl.ReplicaOf(t, primaryOf(hung))
	if replica == nil {
		t.Fatalf("no replica of %s", primaryOf(hung))
	}
	replica.Freeze(t)
	for name, c := range map[string]*Conn{"replica_acks 1": configured, "default": byDefault} {
		start := time.Now()
		err := store(c, hung, "v2")
		var short *ReplicaAcksError
		if !errors.As(err, &short) {
			t.Errorf("%s: Store on the primary whose replica hangs: %v, want an error naming replica_acks", name, err)
		}
		if took := time.Since(start); took > 1500*time.Millisecond {
			t.Errorf("%s: it took %v", name, took)
		}
		if err := store(c, fine, "v2"); err != nil {
			t.Errorf("%s: Store on another primary: %v (WAIT ran elsewhere than where it wrote?)", name, err)
		}
		lock := tokens.LockName("acks", tokens.Subject{Tenant: fine})
		if err := c.Records().Lock(ctx(), lock); err != nil {
			t.Errorf("%s: Lock on another primary: %v", name, err)
		} else {
			_ = c.Records().Unlock(ctx(), lock)
		}
	}
}

// A Cluster primary killed (SIGKILL): once the Cluster has promoted its
// replica, the same Conn stores, locks and reads again within 5 s, with no
// new connection made, and a record stored before the kill (acknowledged by
// the replica: replica_acks by default) is still there.
func TestClusterFailoverResumes(t *testing.T) {
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s is not on PATH: install it (apt-get install redis-server; CI does)", bin)
		}
	}
	cl := testproc.StartClusterWithReplicas(t, testproc.RedisConfig{})
	cfg := ClusterConfig{Addrs: cl.Addrs()}
	opts, err := ClusterOptions(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := NewCluster(t.Name(), shareOwner{limiterOwner{clk: clock.New()}, "failover"}, opts, RedactCluster(cfg), zap.NewNop(), func() {})
	t.Cleanup(func() { _ = c.Destruct() })
	ctx := func() context.Context {
		cx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		t.Cleanup(cancel)
		return cx
	}
	subj := tokens.Subject{Tenant: "1234567"}
	key, lock := tokens.RecordKey("failover", subj), tokens.LockName("failover", subj)
	if err := c.Records().Store(ctx(), key, []byte("before")); err != nil {
		t.Fatal(err)
	}
	node, err := c.client.(*redis.ClusterClient).MasterForKey(ctx(), RecordKey(key))
	if err != nil {
		t.Fatal(err)
	}
	primary := node.Options().Addr
	replica := cl.ReplicaOf(t, primary)
	for _, n := range cl.Nodes() {
		if n.Addr() == primary {
			n.Kill()
		}
	}
	rc := redis.NewClient(&redis.Options{Addr: replica.Addr(), MaxRetries: -1})
	defer rc.Close()
	testproc.WaitFor(t, "the Cluster promotes the replica", 15*time.Second, func() bool {
		role, err := rc.Do(ctx(), "ROLE").Slice()
		return err == nil && len(role) > 0 && role[0] == "master"
	})
	promoted := time.Now()
	var last error
	if _, err := testproc.Poll(5*time.Second, func() bool {
		if last = c.Records().Store(ctx(), key+".probe", []byte("after")); last != nil {
			return false
		}
		if last = c.Records().Lock(ctx(), lock); last != nil {
			return false
		}
		last = c.Records().Unlock(ctx(), lock)
		return last == nil
	}); err != nil {
		t.Fatalf("no store and lock within 5 s of the promotion: %v", last)
	}
	t.Logf("stores and locks again %v after the replica was promoted", time.Since(promoted).Round(time.Millisecond))
	if v, err := c.Records().Load(ctx(), key); err != nil || string(v) != "before" {
		t.Errorf("the record stored before the kill: %q, %v", v, err)
	}
}
