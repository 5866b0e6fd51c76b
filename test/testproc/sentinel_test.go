package testproc

import (
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Killing the primary makes the Sentinels promote the replica, which has
// the primary's data, within seconds; a client that asks the Sentinels
// follows.
func TestSentinelFailover(t *testing.T) {
	begin := time.Now()
	s := StartSentinel(t, SentinelConfig{Node: RedisConfig{AppendOnly: true}})
	t.Logf("started in %v", time.Since(begin))
	if s.MasterName() != "fortnox" || len(s.SentinelAddrs()) != 3 || len(s.Nodes()) != 2 || len(s.Sentinels()) != 3 {
		t.Fatalf("master %q, sentinels %v, %d nodes", s.MasterName(), s.SentinelAddrs(), len(s.Nodes()))
	}
	primary, err := s.Primary(testContext(t))
	if err != nil || primary != s.Nodes()[0].Addr() {
		t.Fatalf("the Sentinels name %s (%v), want the primary %s", primary, err, s.Nodes()[0].Addr())
	}
	if s.Node(primary) != s.Nodes()[0] || s.Node("127.0.0.1:1") != nil {
		t.Error("Node does not find the nodes by address")
	}
	if got := config(t, client(t, s.Nodes()[0].Addr()), "appendonly"); got != "yes" {
		t.Errorf("the nodes' settings are not used: appendonly %s", got)
	}

	fc := redis.NewFailoverClient(&redis.FailoverOptions{MasterName: s.MasterName(), SentinelAddrs: s.SentinelAddrs()})
	defer fc.Close()
	if err := fc.Set(testContext(t), "k", "before", 0).Err(); err != nil {
		t.Fatal(err)
	}
	// WAIT: the replica has it before the primary dies.
	if n, err := fc.Wait(testContext(t), 1, 2000).Result(); err != nil || n != 1 {
		t.Fatalf("WAIT 1 = %d, %v", n, err)
	}

	start := time.Now()
	old, primary := s.Failover(t, 30*time.Second)
	t.Logf("failover from %s to %s in %v", old, primary, time.Since(start))
	if old != s.Nodes()[0].Addr() || primary != s.Nodes()[1].Addr() {
		t.Fatalf("failover from %s to %s; want from %s to %s", old, primary, s.Nodes()[0].Addr(), s.Nodes()[1].Addr())
	}
	if s.Nodes()[0].Running() {
		t.Error("the old primary runs")
	}
	if got, err := fc.Get(testContext(t), "k").Result(); err != nil || got != "before" {
		t.Errorf("GET k through the Sentinels after the failover = %q, %v", got, err)
	}
	if err := fc.Set(testContext(t), "k", "after", 0).Err(); err != nil {
		t.Errorf("SET through the Sentinels after the failover: %v", err)
	}
	if got, err := client(t, primary).Get(testContext(t), "k").Result(); err != nil || got != "after" {
		t.Errorf("GET k on the new primary = %q, %v", got, err)
	}
	if !slices.Contains(s.SentinelAddrs(), s.Sentinels()[2].Addr()) {
		t.Error("SentinelAddrs and Sentinels disagree")
	}
}
