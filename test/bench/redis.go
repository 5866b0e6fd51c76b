package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// The limiter comparison (-compare limiter) runs Redis beside the two
// Caddy processes: (b) keeps its tenants' rate budget there, one Lua
// script per request, where (a) keeps it in process.

// redisServer is a redis-server for the bench, on 127.0.0.1.
type redisServer struct {
	server *testproc.Redis
	addr   string
	client *redis.Client
}

// startRedis starts redis-server in dir. appendfsync is always, everysec
// or off (no append-only file at all).
func startRedis(dir, appendfsync string) (*redisServer, error) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		return nil, errors.New("-compare limiter needs redis-server on PATH (apt-get install redis-server)")
	}
	cfg := testproc.RedisConfig{Dir: dir}
	switch appendfsync {
	case "off":
	case "always", "everysec":
		cfg.AppendOnly, cfg.AppendFsync = true, appendfsync
	default:
		return nil, fmt.Errorf("-appendfsync %q: want always, everysec or off", appendfsync)
	}
	server, err := testproc.LaunchRedis(cfg)
	if err != nil {
		return nil, err
	}
	r := &redisServer{server: server, addr: server.Addr()}
	r.client = redis.NewClient(&redis.Options{Addr: r.addr})
	return r, nil
}

func (r *redisServer) url() string { return "redis://" + r.addr + "/0" }

func (r *redisServer) stop() {
	r.client.Close()
	r.server.Kill()
}

// flush empties Redis between rounds, so that each round's (b) fetches its
// own tokens as (a) does.
func (r *redisServer) flush() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return r.client.FlushAll(ctx).Err()
}

// cpu is the CPU time redis-server has used so far (Linux; 0 elsewhere).
func (r *redisServer) cpu() time.Duration { return processCPU(r.server.Pid()) }

// commandStats reads INFO commandstats: calls per command.
func (r *redisServer) commandStats() (map[string]int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := r.client.Info(ctx, "commandstats").Result()
	if err != nil {
		return nil, err
	}
	return parseCommandStats(info)
}

// parseCommandStats reads the calls of each command from INFO
// commandstats.
func parseCommandStats(info string) (map[string]int64, error) {
	out := map[string]int64{}
	for _, line := range strings.Split(info, "\r\n") {
		name, rest, ok := strings.Cut(strings.TrimPrefix(line, "cmdstat_"), ":calls=")
		if !ok || !strings.HasPrefix(line, "cmdstat_") {
			continue
		}
		calls, _, _ := strings.Cut(rest, ",")
		n, err := strconv.ParseInt(calls, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("INFO commandstats line %q", line)
		}
		out[name] = n
	}
	return out, nil
}

// commandCount is what Redis did for n cached requests through (b).
type commandCount struct {
	requests int
	// stats: INFO commandstats after less before, per command. It counts
	// the commands a Lua script runs inside Redis as well.
	stats map[string]int64
	// sent: the commands clients sent (MONITOR's lines from a client
	// address, without those run by a script, "[0 lua]"), per command;
	// the bench's own INFO and MONITOR are left out.
	sent map[string]int64
}

// countRedisCommands sends n requests (one at a time, over the tenants)
// through url, all on the cached path, and counts the Redis commands they
// caused, both with INFO commandstats and with MONITOR.
func countRedisCommands(r *redisServer, url string, tenants []string, n int) (*commandCount, error) {
	mon, err := startMonitor(r.addr)
	if err != nil {
		return nil, err
	}
	before, err := r.commandStats()
	if err != nil {
		mon.stop()
		return nil, err
	}
	client := &http.Client{Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	for i := range n {
		if err := getOK(client, url, tenants[i%len(tenants)], ""); err != nil {
			mon.stop()
			return nil, fmt.Errorf("counting Redis commands: %w", err)
		}
	}
	after, err := r.commandStats()
	sent := mon.stop()
	if err != nil {
		return nil, err
	}
	c := &commandCount{requests: n, stats: map[string]int64{}, sent: sent}
	for name, calls := range after {
		if d := calls - before[name]; d > 0 && name != "info" && name != "monitor" {
			c.stats[name] = d
		}
	}
	return c, nil
}

// perRequest formats counts per request, the largest first.
func perRequest(m map[string]int64, requests int) string {
	names := make([]string, 0, len(m))
	for name := range m {
		names = append(names, name)
	}
	sort.Slice(names, func(i, j int) bool {
		return m[names[i]] > m[names[j]] || (m[names[i]] == m[names[j]] && names[i] < names[j])
	})
	parts := make([]string, 0, len(names))
	for _, name := range names {
		parts = append(parts, fmt.Sprintf("%s %.3f", name, float64(m[name])/float64(requests)))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func total(m map[string]int64) (n int64) {
	for _, v := range m {
		n += v
	}
	return n
}

// monitor reads Redis's MONITOR stream on its own connection.
type monitor struct {
	conn net.Conn
	mu   sync.Mutex
	sent map[string]int64
	done chan struct{}
}

func startMonitor(addr string) (*monitor, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Write([]byte("MONITOR\r\n")); err != nil {
		conn.Close()
		return nil, err
	}
	rd := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := rd.ReadString('\n'); err != nil || !strings.HasPrefix(line, "+OK") {
		conn.Close()
		return nil, fmt.Errorf("MONITOR: %q %v", line, err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	m := &monitor{conn: conn, sent: map[string]int64{}, done: make(chan struct{})}
	go func() {
		defer close(m.done)
		for {
			line, err := rd.ReadString('\n')
			if err != nil {
				return
			}
			name, fromClient := monitorCommand(line)
			if !fromClient || name == "info" { // the bench's own INFO
				continue
			}
			m.mu.Lock()
			m.sent[name]++
			m.mu.Unlock()
		}
	}()
	return m, nil
}

// monitorCommand reads one MONITOR line: the command's name, and whether
// a client sent it (not a Lua script inside Redis).
//
//	+1700000000.123456 [0 127.0.0.1:40000] "evalsha" "…" …
//	+1700000000.123457 [0 lua] "llen" "…"
func monitorCommand(line string) (name string, fromClient bool) {
	_, rest, ok := strings.Cut(line, " [")
	if !ok {
		return "", false
	}
	source, args, ok := strings.Cut(rest, "] \"")
	if !ok {
		return "", false
	}
	name, _, _ = strings.Cut(args, "\"")
	return strings.ToLower(name), !strings.HasSuffix(source, " lua")
}

// stop ends the stream (after a moment for the last lines) and returns the
// commands clients sent.
func (m *monitor) stop() map[string]int64 {
	time.Sleep(200 * time.Millisecond)
	m.conn.Close()
	<-m.done
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.sent
}

// processCPU is a process's CPU time so far, the sum over its threads of
// /proc/<pid>/task/*/schedstat (Linux; 0 elsewhere).
func processCPU(pid int) time.Duration {
	tasks, err := globTasks(pid)
	if err != nil || len(tasks) == 0 {
		return 0
	}
	var sum time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // the thread has just exited
		}
		fields := strings.Fields(string(b))
		if len(fields) == 0 {
			continue
		}
		ns, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0
		}
		sum += time.Duration(ns)
	}
	return sum
}
