package testproc

import (
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Three primaries share the slots; with one killed the cluster fails, and
// it is whole again once the node is back.
func TestClusterKillAndRestart(t *testing.T) {
	begin := time.Now()
	c := StartCluster(t, RedisConfig{})
	t.Logf("started in %v", time.Since(begin))
	addrs := c.Addrs()
	if len(addrs) != 3 || len(c.Nodes()) != 3 {
		t.Fatalf("addresses %v", addrs)
	}
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
	defer cc.Close()
	// Keys on every node: the slots are spread over the three.
	owners := map[string]bool{}
	for i := range 30 {
		key := fmt.Sprintf("key-%d", i)
		if err := cc.Set(testContext(t), key, i, 0).Err(); err != nil {
			t.Fatal(err)
		}
		node, err := cc.MasterForKey(testContext(t), key)
		if err != nil {
			t.Fatal(err)
		}
		owners[node.Options().Addr] = true
	}
	if len(owners) != 3 {
		t.Errorf("30 keys on %d nodes (%v), want all three", len(owners), owners)
	}
	for _, addr := range addrs {
		if state, err := c.State(testContext(t), addr); err != nil || state != "ok" {
			t.Errorf("%s: cluster_state %q, %v", addr, state, err)
		}
	}

	start := time.Now()
	c.Kill(1)
	c.WaitState(t, "fail", 15*time.Second)
	t.Logf("cluster_state:fail %v after the kill", time.Since(start))
	if err := client(t, addrs[0]).Get(testContext(t), "key-0").Err(); err == nil {
		t.Error("a node of a failed cluster served a GET")
	}

	if err := c.Nodes()[1].Restart(); err != nil {
		t.Fatal(err)
	}
	c.WaitState(t, "ok", 15*time.Second)
	// The restarted node had no append-only file: its keys are gone, the
	// others' are there.
	for i := range 30 {
		got, err := cc.Get(testContext(t), fmt.Sprintf("key-%d", i)).Int()
		if owner := mustOwner(t, cc, i); owner == c.Nodes()[1].Addr() {
			if err != redis.Nil {
				t.Errorf("key-%d on the restarted node = %d, %v; want none", i, got, err)
			}
		} else if err != nil || got != i {
			t.Errorf("key-%d on %s = %d, %v", i, owner, got, err)
		}
	}
}
func mustOwner(t *testing.T, cc *redis.ClusterClient, i int) string {
	t.Helper()
	node, err := cc.MasterForKey(testContext(t), fmt.Sprintf("key-%d", i))
	if err != nil {
		t.Fatal(err)
	}
	return node.Options().Addr
}
