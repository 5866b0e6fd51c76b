package testproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// RedisConfig is how StartRedis runs redis-server. Every server listens on
// 127.0.0.1 only and never snapshots (--save "").
type RedisConfig struct {
	// AppendOnly turns the append-only file on (--appendonly yes), written
	// with AppendFsync; off, the server keeps nothing on disk.
	AppendOnly bool
	// AppendFsync is always (fsync on every write, as the plugin's docs
	// recommend), everysec or no; "" is always.
	AppendFsync string
	// Dir is the server's working directory (appendonlydir/, nodes.conf).
	// "" is a fresh t.TempDir() for StartRedis; LaunchRedis needs one.
	Dir string
	// Port is the port to listen on; 0 is a free one.
	Port int
	// Args are more redis-server arguments, e.g. "--replicaof",
	// "127.0.0.1", "6380".
	Args []string
}

// Redis is one redis-server process, which a test can kill with SIGKILL (a
// crash) and start again on the same port and directory: with the
// append-only file on, it comes back with what it had acknowledged.
type Redis struct {
	bin  string
	cfg  RedisConfig
	port int
	dir  string
	// sentinelConf, when set, runs the server as a Sentinel:
	// redis-server <sentinelConf> --sentinel (its port and dir are in it).
	sentinelConf string

	mu   sync.Mutex
	proc *Proc // nil while killed
	out  *syncBuffer
}

// StartRedis starts redis-server with cfg on 127.0.0.1 and waits until it
// answers and has loaded its data; it kills the server when the test ends.
// Without redis-server on PATH the test is skipped, or fails in CI.
func StartRedis(t testing.TB, cfg RedisConfig) *Redis {
	t.Helper()
	bin := Binary(t, "redis-server")
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	r, err := launchRedis(bin, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Kill)
	return r
}

// LaunchRedis is StartRedis without a test: cfg.Dir must be set, and the
// caller kills the server (Kill or Stop).
func LaunchRedis(cfg RedisConfig) (*Redis, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("redis-server is not on PATH (%s)", installHint("redis-server"))
	}
	if cfg.Dir == "" {
		return nil, errors.New("testproc.LaunchRedis: no Dir")
	}
	return launchRedis(bin, cfg, nil)
}

// launchRedis starts a server. When cfg.Port is 0 the port is found by
// listening and closing, so another process may take it in between: it
// tries three times. pick, when set, chooses the ports of each try
// instead (a cluster node's bus port as well).
func launchRedis(bin string, cfg RedisConfig, pick func(*RedisConfig) error) (*Redis, error) {
	if cfg.AppendOnly && cfg.AppendFsync == "" {
		cfg.AppendFsync = "always"
	}
	var lastErr error
	for range 3 {
		try := cfg
		try.Args = append([]string(nil), cfg.Args...)
		switch {
		case pick != nil:
			if err := pick(&try); err != nil {
				return nil, err
			}
		case try.Port == 0:
			port, err := PickPort()
			if err != nil {
				return nil, err
			}
			try.Port = port
		}
		r := &Redis{bin: bin, cfg: try, port: try.Port, dir: try.Dir}
		if lastErr = r.launch(); lastErr == nil {
			return r, nil
		}
		if cfg.Port != 0 {
			time.Sleep(100 * time.Millisecond) // the same port: give it a moment
		}
	}
	return nil, fmt.Errorf("redis-server did not start: %v", lastErr)
}

func (r *Redis) args() []string {
	if r.sentinelConf != "" {
		return []string{r.sentinelConf, "--sentinel"}
	}
	args := []string{"--save", "", "--port", strconv.Itoa(r.port), "--bind", "127.0.0.1", "--dir", r.dir}
	if r.cfg.AppendOnly {
		args = append(args, "--appendonly", "yes", "--appendfsync", r.cfg.AppendFsync)
	} else {
		args = append(args, "--appendonly", "no")
	}
	return append(args, r.cfg.Args...)
}

// launch starts the process and waits until it answers and has loaded its
// data (its append-only file, with AppendOnly). It fails when the process
// exits, or when the port answered for another redis-server.
func (r *Redis) launch() error {
	out := &syncBuffer{}
	cmd := exec.Command(r.bin, r.args()...)
	cmd.Dir = r.dir
	cmd.Stdout, cmd.Stderr = out, out
	p, err := Launch(cmd)
	if err != nil {
		return fmt.Errorf("starting redis-server: %w", err)
	}
	client := redis.NewClient(&redis.Options{Addr: r.Addr(), MaxRetries: -1})
	defer client.Close()
	// INFO rather than PING: it also tells whether the server that answers
	// is ours and not another one that took the port, and whether it is
	// still loading its data (INFO answers meanwhile). A Sentinel has no
	// persistence section and loads nothing.
	sections := []string{"server", "persistence"}
	if r.sentinelConf != "" {
		sections = sections[:1]
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		info, err := client.Info(ctx, sections...).Result()
		cancel()
		if err == nil {
			if !strings.Contains(info, "process_id:"+strconv.Itoa(p.Pid())+"\r\n") {
				p.Kill()
				return fmt.Errorf("port %s taken by another redis-server", r.Addr())
			}
			if r.sentinelConf != "" || strings.Contains(info, "loading:0\r\n") {
				r.proc, r.out = p, out
				return nil
			}
		}
		select {
		case <-p.Done():
			return fmt.Errorf("redis-server exited: %s", out)
		case <-time.After(pollEvery):
		}
		if time.Now().After(deadline) {
			p.Kill()
			return fmt.Errorf("no answer (or still loading) within 10s: %s", out)
		}
	}
}

// Addr is host:port, the same across restarts.
func (r *Redis) Addr() string { return Addr(r.port) }

// Port is the server's port.
func (r *Redis) Port() int { return r.port }

// URL is the redis:// URL of database 0.
func (r *Redis) URL() string { return "redis://" + r.Addr() + "/0" }

// Dir is the server's working directory (appendonlydir/ with AppendOnly).
func (r *Redis) Dir() string { return r.dir }

// Pid is the running process's id; 0 while killed.
func (r *Redis) Pid() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.proc == nil {
		return 0
	}
	return r.proc.Pid()
}

// Running reports whether the process runs (it was not killed or stopped
// and has not exited).
func (r *Redis) Running() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.proc != nil && !r.proc.Exited()
}

// Log is what the latest process wrote to its standard output and error.
func (r *Redis) Log() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.out == nil {
		return ""
	}
	return r.out.String()
}

// Kill ends the server with SIGKILL, as a crash would, and waits until it
// is gone. Killing a killed server does nothing.
func (r *Redis) Kill() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.proc != nil {
		r.proc.Kill()
		r.proc = nil
	}
}

// Freeze stops the server's process (SIGSTOP) until the returned thaw is
// called (SIGCONT; also when the test ends): it holds its connections but
// answers nothing, as a replica whose host hangs would.
func (r *Redis) Freeze(t testing.TB) (thaw func()) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.proc == nil {
		t.Fatal("Freeze: the server is not running")
	}
	cmd := r.proc.Cmd()
	if err := pause(cmd, true); err != nil {
		t.Fatalf("Freeze: %v", err)
	}
	var once sync.Once
	thaw = func() { once.Do(func() { _ = pause(cmd, false) }) }
	t.Cleanup(thaw)
	return thaw
}

// Stop ends the server gracefully (SIGTERM: it flushes its append-only
// file and exits) and waits until it is gone, or kills it after 10 s and
// says so. Stopping a stopped server does nothing.
func (r *Redis) Stop() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.proc == nil {
		return nil
	}
	err := r.proc.Stop(syscall.SIGTERM, 10*time.Second)
	r.proc = nil
	return err
}

// Restart starts a killed (or stopped, or exited) server again on the same
// port and directory, with the same settings, and waits until it has
// loaded its data. Its log is in the error when it cannot start (the port
// was taken meanwhile, most likely).
func (r *Redis) Restart() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.proc != nil && !r.proc.Exited() {
		return fmt.Errorf("testproc: Restart of the redis-server on %s, which is running", r.Addr())
	}
	r.proc = nil
	var lastErr error
	for range 3 {
		if lastErr = r.launch(); lastErr == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("redis-server did not start again on %s: %v", r.Addr(), lastErr)
}

// syncBuffer collects a process's output safely while it runs.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
