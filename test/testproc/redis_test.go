package testproc

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func client(t *testing.T, addr string) *redis.Client {
	rc := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	t.Cleanup(func() { rc.Close() })
	return rc
}

func config(t *testing.T, rc *redis.Client, name string) string {
	t.Helper()
	got, err := rc.ConfigGet(testContext(t), name).Result()
	if err != nil {
		t.Fatal(err)
	}
	return got[name]
}

// The append-only settings are the server's, and with fsync always what
// it acknowledged survives SIGKILL: Restart comes back on the same port
// and directory with it.
func TestRedisAppendOnlySurvivesKill(t *testing.T) {
	r := StartRedis(t, RedisConfig{AppendOnly: true, AppendFsync: "always"})
	rc := client(t, r.Addr())
	if got := config(t, rc, "appendonly") + " " + config(t, rc, "appendfsync"); got != "yes always" {
		t.Fatalf("appendonly appendfsync = %s", got)
	}
	if got := config(t, rc, "dir"); got != r.Dir() {
		t.Errorf("dir %s, want %s", got, r.Dir())
	}
	if err := rc.Set(testContext(t), "k", "acknowledged", 0).Err(); err != nil {
		t.Fatal(err)
	}
	pid := r.Pid()
	addr := r.Addr()

	r.Kill()
	if r.Running() || r.Pid() != 0 {
		t.Fatal("running after Kill")
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatal("the port still answers after Kill")
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("the killed process %d: %v", pid, err)
	}
	r.Kill() // again: nothing

	if err := r.Restart(); err != nil {
		t.Fatal(err)
	}
	if r.Addr() != addr || r.Pid() == pid || r.Pid() == 0 {
		t.Errorf("after Restart: %s pid %d; want %s and a new process (was %d)", r.Addr(), r.Pid(), addr, pid)
	}
	if got, err := rc.Get(testContext(t), "k").Result(); err != nil || got != "acknowledged" {
		t.Fatalf("after SIGKILL and Restart: GET k = %q, %v", got, err)
	}
	if err := r.Restart(); err == nil {
		t.Error("Restart of a running server succeeded")
	}

	if err := r.Stop(); err != nil {
		t.Fatal(err)
	}
	if r.Running() {
		t.Error("running after Stop")
	}
	if err := r.Stop(); err != nil {
		t.Errorf("Stop of a stopped server: %v", err)
	}
}

// appendfsync is as chosen, and without the append-only file nothing
// survives a kill.
func TestRedisAppendOnlySettings(t *testing.T) {
	t.Run("everysec", func(t *testing.T) {
		r := StartRedis(t, RedisConfig{AppendOnly: true, AppendFsync: "everysec"})
		rc := client(t, r.Addr())
		if got := config(t, rc, "appendonly") + " " + config(t, rc, "appendfsync"); got != "yes everysec" {
			t.Errorf("appendonly appendfsync = %s", got)
		}
		if _, err := os.Stat(filepath.Join(r.Dir(), "appendonlydir")); err != nil {
			t.Errorf("no append-only file in the server's directory: %v", err)
		}
	})
	t.Run("default fsync", func(t *testing.T) {
		r := StartRedis(t, RedisConfig{AppendOnly: true})
		if got := config(t, client(t, r.Addr()), "appendfsync"); got != "always" {
			t.Errorf("appendfsync = %s, want always", got)
		}
	})
	t.Run("off", func(t *testing.T) {
		r := StartRedis(t, RedisConfig{})
		rc := client(t, r.Addr())
		if got := config(t, rc, "appendonly") + " " + config(t, rc, "save"); got != "no " {
			t.Errorf("appendonly save = %q, want no and none", got)
		}
		if err := rc.Set(testContext(t), "k", "v", 0).Err(); err != nil {
			t.Fatal(err)
		}
		r.Kill()
		if err := r.Restart(); err != nil {
			t.Fatal(err)
		}
		if n, err := rc.Exists(testContext(t), "k").Result(); err != nil || n != 0 {
			t.Errorf("without an append-only file the key survived a kill: %d, %v", n, err)
		}
	})
	t.Run("args and port", func(t *testing.T) {
		port := FreePort(t)
		r := StartRedis(t, RedisConfig{Port: port, Args: []string{"--maxmemory", "10mb"}})
		if r.Port() != port || r.URL() != "redis://"+Addr(port)+"/0" {
			t.Fatalf("port %d URL %s; want %d", r.Port(), r.URL(), port)
		}
		if got := config(t, client(t, r.Addr()), "maxmemory"); got != "10485760" {
			t.Errorf("maxmemory = %s", got)
		}
	})
}

// LaunchRedis needs a directory and leaves stopping to the caller.
func TestLaunchRedis(t *testing.T) {
	if _, err := LaunchRedis(RedisConfig{}); err == nil || !strings.Contains(err.Error(), "no Dir") {
		t.Errorf("LaunchRedis without a Dir: %v", err)
	}
	r, err := LaunchRedis(RedisConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Kill()
	if err := client(t, r.Addr()).Ping(testContext(t)).Err(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.Log(), "Ready to accept connections") {
		t.Errorf("log: %s", r.Log())
	}
}

// A port another redis-server answers on is not taken for ours.
func TestRedisPortTaken(t *testing.T) {
	other := StartRedis(t, RedisConfig{})
	bin := Binary(t, "redis-server")
	r := &Redis{bin: bin, port: other.Port(), dir: t.TempDir()}
	err := r.launch()
	if err == nil {
		r.Kill()
		t.Fatal("launched on a port another server has")
	}
	if !strings.Contains(err.Error(), "exited") && !strings.Contains(err.Error(), "taken") {
		t.Errorf("error %v", err)
	}
}
