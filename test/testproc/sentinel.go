package testproc

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// SentinelConfig is how StartSentinel runs its servers.
type SentinelConfig struct {
	// Master is the name the Sentinels monitor the primary under; "" is
	// "fortnox".
	Master string
	// Node is the primary's and the replica's settings; Port and Dir are
	// chosen for each.
	Node RedisConfig
	// DownAfter is down-after-milliseconds, how long the primary must not
	// answer before a Sentinel thinks it down; 0 is 1s.
	DownAfter time.Duration
	// FailoverTimeout is failover-timeout; a failed failover is tried again
	// after twice that. 0 is 2s.
	FailoverTimeout time.Duration
}

// Sentinel is a primary, one replica of it, and three Sentinels that
// monitor the primary (quorum 2), each its own redis-server process on
// 127.0.0.1. Killing the primary makes the Sentinels promote the replica
// within a few seconds.
type Sentinel struct {
	master    string
	nodes     []*Redis // the primary as started, then the replica
	sentinels []*Redis
}

// StartSentinel starts the primary and its replica, waits until the
// replica is in sync, starts three Sentinels with their configuration
// files in t.TempDir(), and waits until every Sentinel knows the replica
// and the other two Sentinels, so that a failover can happen. Everything
// is killed when the test ends.
func StartSentinel(t testing.TB, cfg SentinelConfig) *Sentinel {
	t.Helper()
	if cfg.Master == "" {
		cfg.Master = "fortnox"
	}
	if cfg.DownAfter == 0 {
		cfg.DownAfter = time.Second
	}
	if cfg.FailoverTimeout == 0 {
		cfg.FailoverTimeout = 2 * time.Second
	}
	node := cfg.Node
	node.Port, node.Dir = 0, ""
	// A replica's full sync starts at once, not after the default 5 s wait
	// for more replicas.
	node.Args = append(append([]string(nil), node.Args...), "--repl-diskless-sync-delay", "0")
	s := &Sentinel{master: cfg.Master}
	primary := StartRedis(t, node)
	replicaCfg := node
	replicaCfg.Args = append(append([]string(nil), node.Args...), "--replicaof", "127.0.0.1", fmt.Sprint(primary.Port()))
	replica := StartRedis(t, replicaCfg)
	s.nodes = []*Redis{primary, replica}
	rc := redis.NewClient(&redis.Options{Addr: replica.Addr(), MaxRetries: -1})
	defer rc.Close()
	WaitFor(t, "the replica in sync with the primary", 10*time.Second, func() bool {
		ctx, cancel := callContext()
		defer cancel()
		info, err := rc.Info(ctx, "replication").Result()
		return err == nil && strings.Contains(info, "master_link_status:up\r\n")
	})

	bin := Binary(t, "redis-server")
	for i := range 3 {
		s.sentinels = append(s.sentinels, startSentinelProc(t, bin, i, primary.Port(), cfg))
	}
	WaitFor(t, "every Sentinel knows the replica and the other Sentinels", 20*time.Second, func() bool {
		for _, sn := range s.sentinels {
			if !s.sentinelReady(sn.Addr(), primary.Addr()) {
				return false
			}
		}
		return true
	})
	return s
}

// startSentinelProc writes a Sentinel's configuration file (Sentinel
// rewrites it with what it learns, so it must be its own and writable) and
// starts redis-server <conf> --sentinel on a free port.
func startSentinelProc(t testing.TB, bin string, i, primaryPort int, cfg SentinelConfig) *Redis {
	t.Helper()
	dir := t.TempDir()
	conf := filepath.Join(dir, fmt.Sprintf("sentinel-%d.conf", i))
	var lastErr error
	for range 3 {
		port := FreePort(t)
		text := fmt.Sprintf(`port %[1]d
bind 127.0.0.1
dir %[2]s
sentinel monitor %[3]s 127.0.0.1 %[4]d 2
sentinel down-after-milliseconds %[3]s %[5]d
sentinel failover-timeout %[3]s %[6]d
sentinel parallel-syncs %[3]s 1
`, port, dir, cfg.Master, primaryPort, cfg.DownAfter.Milliseconds(), cfg.FailoverTimeout.Milliseconds())
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		r := &Redis{bin: bin, port: port, dir: dir, sentinelConf: conf}
		if lastErr = r.launch(); lastErr == nil {
			t.Cleanup(r.Kill)
			return r
		}
	}
	t.Fatalf("Sentinel %d did not start: %v", i, lastErr)
	return nil
}

// sentinelReady reports whether the Sentinel at addr names primary, knows
// a replica that is up, and knows the two other Sentinels.
func (s *Sentinel) sentinelReady(addr, primary string) bool {
	sc := redis.NewSentinelClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer sc.Close()
	ctx, cancel := callContext()
	defer cancel()
	got, err := sc.GetMasterAddrByName(ctx, s.master).Result()
	if err != nil || len(got) != 2 || got[0]+":"+got[1] != primary {
		return false
	}
	replicas, err := sc.Replicas(ctx, s.master).Result()
	if err != nil || len(replicas) != 1 || strings.Contains(replicas[0]["flags"], "down") || strings.Contains(replicas[0]["flags"], "disconnected") {
		return false
	}
	others, err := sc.Sentinels(ctx, s.master).Result()
	return err == nil && len(others) == len(s.sentinels)-1
}

// MasterName is the name the Sentinels know the primary by.
func (s *Sentinel) MasterName() string { return s.master }

// SentinelAddrs are the Sentinels' host:port addresses.
func (s *Sentinel) SentinelAddrs() []string {
	var addrs []string
	for _, sn := range s.sentinels {
		addrs = append(addrs, sn.Addr())
	}
	return addrs
}

// Sentinels are the three Sentinel processes (a test can kill one).
func (s *Sentinel) Sentinels() []*Redis { return s.sentinels }

// Nodes are the data nodes: the primary as started, then the replica. A
// failover swaps their roles; Node finds one by address.
func (s *Sentinel) Nodes() []*Redis { return s.nodes }

// Node is the data node at addr, or nil.
func (s *Sentinel) Node(addr string) *Redis {
	for _, n := range s.nodes {
		if n.Addr() == addr {
			return n
		}
	}
	return nil
}

// Primary is the address the Sentinels name as the primary (SENTINEL
// get-master-addr-by-name), when every running Sentinel names the same
// one; an error otherwise.
func (s *Sentinel) Primary(ctx context.Context) (string, error) {
	var primary string
	for _, sn := range s.sentinels {
		if !sn.Running() {
			continue
		}
		sc := redis.NewSentinelClient(&redis.Options{Addr: sn.Addr(), MaxRetries: -1})
		got, err := sc.GetMasterAddrByName(ctx, s.master).Result()
		sc.Close()
		if err != nil {
			return "", fmt.Errorf("Sentinel %s: %w", sn.Addr(), err)
		}
		if len(got) != 2 {
			return "", fmt.Errorf("Sentinel %s: get-master-addr-by-name answered %q", sn.Addr(), got)
		}
		addr := got[0] + ":" + got[1]
		if primary != "" && addr != primary {
			return "", fmt.Errorf("the Sentinels disagree: %s and %s", primary, addr)
		}
		primary = addr
	}
	if primary == "" {
		return "", fmt.Errorf("no Sentinel runs")
	}
	return primary, nil
}

// KillPrimary kills (SIGKILL) the node the Sentinels name as the primary
// and returns its address.
func (s *Sentinel) KillPrimary(t testing.TB) string {
	t.Helper()
	ctx, cancel := callContext()
	defer cancel()
	primary, err := s.Primary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := s.Node(primary)
	if node == nil {
		t.Fatalf("the Sentinels name %s, which is none of the nodes", primary)
	}
	node.Kill()
	return primary
}

// WaitNewPrimary waits until every running Sentinel names a primary other
// than old and that node answers ROLE as a master, and returns its
// address; it fails the test when within passes first.
func (s *Sentinel) WaitNewPrimary(t testing.TB, old string, within time.Duration) string {
	t.Helper()
	var primary string
	var last error
	if _, err := Poll(within, func() bool {
		ctx, cancel := callContext()
		defer cancel()
		p, err := s.Primary(ctx)
		if err != nil {
			last = err
			return false
		}
		if p == old {
			last = fmt.Errorf("the Sentinels still name %s", old)
			return false
		}
		node := s.Node(p)
		if node == nil {
			last = fmt.Errorf("the Sentinels name %s, which is none of the nodes", p)
			return false
		}
		rc := redis.NewClient(&redis.Options{Addr: p, MaxRetries: -1})
		defer rc.Close()
		role, err := rc.Do(ctx, "ROLE").Slice()
		if err != nil || len(role) == 0 || role[0] != "master" {
			last = fmt.Errorf("%s answers ROLE %v, %v", p, role, err)
			return false
		}
		primary = p
		return true
	}); err != nil {
		t.Fatalf("no new primary instead of %s: %v (last: %v)", old, err, last)
	}
	return primary
}

// Failover kills the primary and waits until the Sentinels have promoted
// the replica (WaitNewPrimary); it returns the old and the new primary's
// addresses.
func (s *Sentinel) Failover(t testing.TB, within time.Duration) (old, primary string) {
	t.Helper()
	old = s.KillPrimary(t)
	return old, s.WaitNewPrimary(t, old, within)
}

// callContext bounds one of the helpers' Redis calls.
func callContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 2*time.Second)
}
