package redisstorage

import (
	"bytes"
	"context"
	"fmt"
	"io"
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
// in CI (see InCI). A package whose tests call it should call
// CheckRedisServer from its TestMain, so that the skip is seen.
func StartRedis(t testing.TB) (addr string) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if InCI() {
			t.Fatal("redis-server is not on PATH, and CI must run every test: .ci/run installs it (apt-get install redis-server)")
		}
		t.Skip("redis-server is not on PATH (apt-get install redis-server)")
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

// InCI reports whether the tests run in CI, where nothing may be skipped:
// CI set to anything but "" "0" or "false" (.ci/run sets CI=true).
func InCI() bool {
	v := strings.ToLower(strings.TrimSpace(os.Getenv("CI")))
	return v != "" && v != "0" && v != "false"
}

// CheckRedisServer is for a TestMain whose package has tests that need
// redis-server (StartRedis). With redis-server on PATH it does nothing and
// returns true. Without it, it announces that group's Redis tests are
// skipped (see AnnounceSkip) and returns whether that is allowed: false in
// CI, and TestMain then exits with 1 before running anything.
func CheckRedisServer(group string) bool {
	if _, err := exec.LookPath("redis-server"); err == nil {
		return true
	}
	return AnnounceSkip(group, "redis-server is not on PATH (apt-get install redis-server)")
}

// AnnounceSkip prints one line saying that group's tests are skipped and
// why, and returns whether skipping is allowed. `go test ./...` shows
// nothing of a passing package's output, so a skip would look green: the
// line also goes to the terminal (/dev/tty) when there is one. In CI
// nothing may skip: the line says FAIL and AnnounceSkip returns false.
func AnnounceSkip(group, reason string) (allowed bool) {
	return announceSkip(os.Stdout, openTerminal, InCI(), group, reason)
}

func announceSkip(stdout io.Writer, terminal func() io.WriteCloser, ci bool, group, reason string) bool {
	if ci {
		fmt.Fprintf(stdout, "FAIL %s: %s, and CI must run every test (.ci/run installs what the tests need)\n", group, reason)
		return false
	}
	line := fmt.Sprintf("SKIP %s: %s\n", group, reason)
	fmt.Fprint(stdout, line)
	if tty := terminal(); tty != nil {
		fmt.Fprint(tty, line)
		tty.Close()
	}
	return true
}

// openTerminal opens the controlling terminal when the test binary's
// standard output is not already one (go test ./... reads the output
// through a pipe); nil when there is none, as in CI.
func openTerminal() io.WriteCloser {
	if fi, err := os.Stdout.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		return nil // the line on stdout is already on the terminal
	}
	tty, err := os.OpenFile("/dev/tty", os.O_WRONLY, 0)
	if err != nil {
		return nil
	}
	return tty
}
