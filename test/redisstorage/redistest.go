package redisstorage

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// StartRedis starts a private redis-server for the test on a free
// 127.0.0.1 port, waits until it answers, and returns its address
// (host:port). The server keeps nothing on disk and is killed when the
// test ends. If redis-server is not on PATH the test is skipped, or fails
// when the environment variable CI is set.
func StartRedis(t testing.TB) (addr string) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("redis-server not installed; .ci/run installs it")
		}
		t.Skip("redis-server not installed (apt-get install redis-server)")
	}
	// The free port is found by listening and closing, so another process
	// may take it in between; try a few times.
	var lastErr string
	for range 3 {
		addr, errText, ok := startRedisOnce(t, bin)
		if ok {
			return addr
		}
		lastErr = errText
	}
	t.Fatalf("redis-server did not start: %s", lastErr)
	return ""
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

func startRedisOnce(t testing.TB, bin string) (addr, errText string, ok bool) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))

	var out syncBuffer
	cmd := exec.Command(bin,
		"--save", "",
		"--appendonly", "no",
		"--port", strconv.Itoa(port),
		"--bind", "127.0.0.1",
		"--dir", t.TempDir(),
	)
	cmd.Stdout = &out
	cmd.Stderr = &out
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting redis-server: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	stop := func() {
		cmd.Process.Kill()
		<-exited
	}

	client := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer client.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		// INFO rather than PING: it also tells whether the server that
		// answers is ours and not another one that took the port.
		info, err := client.Info(ctx, "server").Result()
		cancel()
		if err == nil {
			if !strings.Contains(info, "process_id:"+strconv.Itoa(cmd.Process.Pid)+"\r\n") {
				stop()
				return "", "port " + addr + " taken by another redis-server", false
			}
			t.Cleanup(stop)
			return addr, "", true
		}
		select {
		case <-exited:
			return "", out.String(), false
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			stop()
			return "", "no PING answer within 10s: " + out.String(), false
		}
	}
}
