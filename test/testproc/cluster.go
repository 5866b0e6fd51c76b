package testproc

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Cluster is a Redis Cluster of three primaries (no replicas, unless
// StartClusterWithReplicas), each its
// own redis-server process with its own port, cluster bus port and
// directory on 127.0.0.1. cluster-node-timeout is 1 s, and a cluster that
// lacks a node's slots refuses every command (cluster_state:fail).
type Cluster struct {
	nodes []*Redis
}

// clusterNodeTimeout is each node's cluster-node-timeout.
const clusterNodeTimeout = time.Second

// StartCluster starts three cluster-enabled servers with node's settings
// (Port and Dir are chosen for each), joins them with redis-cli --cluster
// create, and waits until every node says cluster_state:ok. Everything is
// killed when the test ends. Without redis-server or redis-cli on PATH the
// test is skipped, or fails in CI.
func StartCluster(t testing.TB, node RedisConfig) *Cluster {
	t.Helper()
	return startCluster(t, node, 0)
}

// StartClusterWithReplicas is StartCluster with one replica of each
// primary (six servers): it waits until every primary has its replica
// connected and in sync. A killed primary is replaced by its replica
// (cluster-node-timeout 1 s).
func StartClusterWithReplicas(t testing.TB, node RedisConfig) *Cluster {
	t.Helper()
	c := startCluster(t, node, 1)
	WaitFor(t, "every primary has its replica in sync", 20*time.Second, func() bool {
		primaries := 0
		for _, n := range c.nodes {
			ctx, cancel := callContext()
			info, err := c.info(ctx, n.Addr())
			cancel()
			if err != nil {
				return false
			}
			switch {
			case strings.Contains(info, "role:master"):
				if !strings.Contains(info, "connected_slaves:1") || !strings.Contains(info, "state=online") {
					return false
				}
				primaries++
			case !strings.Contains(info, "master_link_status:up"):
				return false
			}
		}
		return primaries == 3
	})
	return c
}

// ReplicaOf is the node that replicates the primary at addr (nil: none).
func (c *Cluster) ReplicaOf(t testing.TB, addr string) *Redis {
	t.Helper()
	ctx, cancel := callContext()
	defer cancel()
	info, err := c.info(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(info, "\r\n") {
		if !strings.HasPrefix(line, "slave0:") {
			continue
		}
		for _, field := range strings.Split(strings.TrimPrefix(line, "slave0:"), ",") {
			if port, ok := strings.CutPrefix(field, "port="); ok {
				for _, n := range c.nodes {
					if strconv.Itoa(n.Port()) == port {
						return n
					}
				}
			}
		}
	}
	return nil
}

// info is INFO replication of the node at addr.
func (c *Cluster) info(ctx context.Context, addr string) (string, error) {
	rc := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer rc.Close()
	return rc.Info(ctx, "replication").Result()
}

func startCluster(t testing.TB, node RedisConfig, replicas int) *Cluster {
	t.Helper()
	bin := Binary(t, "redis-server")
	cli := Binary(t, "redis-cli")
	c := &Cluster{}
	for i := range 3 * (1 + replicas) {
		cfg := node
		cfg.Port, cfg.Dir = 0, t.TempDir()
		cfg.Args = append(append([]string(nil), node.Args...),
			"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", strconv.FormatInt(clusterNodeTimeout.Milliseconds(), 10))
		// The bus port is the port + 10000 unless set: a free port may
		// well be above 55535. Both are chosen for each try.
		r, err := launchRedis(bin, cfg, func(try *RedisConfig) error {
			port, err := PickPort()
			if err != nil {
				return err
			}
			bus, err := PickPort()
			if err != nil {
				return err
			}
			try.Port = port
			try.Args = append(try.Args, "--cluster-port", strconv.Itoa(bus))
			return nil
		})
		if err != nil {
			t.Fatalf("cluster node %d: %v", i, err)
		}
		t.Cleanup(r.Kill)
		c.nodes = append(c.nodes, r)
	}
	args := []string{"--cluster", "create"}
	args = append(args, c.Addrs()...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	c.WaitState(t, "ok", 20*time.Second)
	return c
}

// Addrs are the nodes' host:port addresses.
func (c *Cluster) Addrs() []string {
	var addrs []string
	for _, n := range c.nodes {
		addrs = append(addrs, n.Addr())
	}
	return addrs
}

// Nodes are the three servers; a killed one starts again with Restart
// (its nodes.conf brings it back into the cluster).
func (c *Cluster) Nodes() []*Redis { return c.nodes }

// Kill kills node i (SIGKILL). After cluster-node-timeout the others
// mark it failed, and the cluster's state is fail: its slots have no
// other copy.
func (c *Cluster) Kill(i int) { c.nodes[i].Kill() }

// State is what CLUSTER INFO's cluster_state says on the node at addr.
func (c *Cluster) State(ctx context.Context, addr string) (string, error) {
	rc := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer rc.Close()
	info, err := rc.ClusterInfo(ctx).Result()
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(info, "\r\n") {
		if v, ok := strings.CutPrefix(line, "cluster_state:"); ok {
			return v, nil
		}
	}
	return "", fmt.Errorf("CLUSTER INFO without cluster_state: %q", info)
}

// WaitState waits until every running node's CLUSTER INFO says
// cluster_state:state ("ok" or "fail"); it fails the test when within
// passes first.
func (c *Cluster) WaitState(t testing.TB, state string, within time.Duration) {
	t.Helper()
	var last string
	if _, err := Poll(within, func() bool {
		for _, n := range c.nodes {
			if !n.Running() {
				continue
			}
			ctx, cancel := callContext()
			got, err := c.State(ctx, n.Addr())
			cancel()
			if err != nil || got != state {
				last = fmt.Sprintf("%s: %q %v", n.Addr(), got, err)
				return false
			}
		}
		return true
	}); err != nil {
		t.Fatalf("cluster_state:%s on every node: %v (last: %s)", state, err, last)
	}
}
