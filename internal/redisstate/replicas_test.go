package redisstate

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
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
