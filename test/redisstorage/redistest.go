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
	bin := redisServerBinary(t)
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
	port := freePort(t)
	p, errText := launch(bin, port, t.TempDir(), false)
	if p == nil {
		return "", errText, false
	}
	t.Cleanup(p.stop)
	return p.addr, "", true
}

// freePort finds a free port on 127.0.0.1 by listening and closing, so
// another process may take it before the caller does: callers retry.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// redisProc is one running redis-server.
type redisProc struct {
	addr   string
	cmd    *exec.Cmd
	exited chan struct{}
	out    *syncBuffer
}

func (p *redisProc) stop() {
	p.cmd.Process.Kill()
	<-p.exited
}

// launch starts redis-server on port with dir as its working directory
// and waits until it answers and has loaded its data (its append-only
// file, with aof). It returns nil and why when it did not start, or when
// the port answered for another redis-server.
func launch(bin string, port int, dir string, aof bool) (*redisProc, string) {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	args := []string{"--save", "", "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--dir", dir}
	if aof {
		args = append(args, "--appendonly", "yes", "--appendfsync", "always")
	} else {
		args = append(args, "--appendonly", "no")
	}
	out := &syncBuffer{}
	cmd := exec.Command(bin, args...)
	cmd.Stdout = out
	cmd.Stderr = out
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		return nil, "starting redis-server: " + err.Error()
	}
	p := &redisProc{addr: addr, cmd: cmd, exited: make(chan struct{}), out: out}
	go func() {
		cmd.Wait()
		close(p.exited)
	}()

	client := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer client.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		// INFO rather than PING: it also tells whether the server that
		// answers is ours and not another one that took the port, and
		// whether it is still loading its data (INFO answers meanwhile).
		info, err := client.Info(ctx, "server", "persistence").Result()
		cancel()
		if err == nil {
			if !strings.Contains(info, "process_id:"+strconv.Itoa(cmd.Process.Pid)+"\r\n") {
				p.stop()
				return nil, "port " + addr + " taken by another redis-server"
			}
			if strings.Contains(info, "loading:0\r\n") {
				return p, ""
			}
		}
		select {
		case <-p.exited:
			return nil, out.String()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, "no answer (or still loading) within 10s: " + out.String()
		}
	}
}

// Server is a redis-server that persists to an append-only file written
// with fsync on every write (--appendonly yes --appendfsync always, as the
// plugin's docs recommend), which a test can kill with SIGKILL (a crash)
// and start again on the same port and directory: it comes back with what
// it had acknowledged.
type Server struct {
	t    testing.TB
	bin  string
	dir  string
	port int

	mu   sync.Mutex
	proc *redisProc // nil while killed
}

// StartRedisAOF starts a Server on a free 127.0.0.1 port with a fresh
// directory, and kills it when the test ends. Without redis-server on
// PATH the test is skipped, or fails in CI, as with StartRedis.
func StartRedisAOF(t testing.TB) *Server {
	t.Helper()
	bin := redisServerBinary(t)
	s := &Server{t: t, bin: bin, dir: t.TempDir()}
	var lastErr string
	for range 3 {
		s.port = freePort(t)
		p, errText := launch(bin, s.port, s.dir, true)
		if p != nil {
			s.proc = p
			t.Cleanup(s.Kill)
			return s
		}
		lastErr = errText
	}
	t.Fatalf("redis-server did not start: %s", lastErr)
	return nil
}

// redisServerBinary finds redis-server, or skips (fails in CI) the test.
func redisServerBinary(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if InCI() {
			t.Fatal("redis-server is not on PATH, and CI must run every test: .ci/run installs it (apt-get install redis-server)")
		}
		t.Skip("redis-server is not on PATH (apt-get install redis-server)")
	}
	return bin
}

// Addr is host:port, the same across restarts.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// URL is the redis:// URL of database 0.
func (s *Server) URL() string { return "redis://" + s.Addr() + "/0" }

// Dir holds the append-only files (appendonlydir/).
func (s *Server) Dir() string { return s.dir }

// Kill ends the server with SIGKILL, as a crash would, and waits until it
// is gone. Killing a killed server does nothing.
func (s *Server) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		s.proc.stop()
		s.proc = nil
	}
}

// Restart starts a killed server again on the same port and directory and
// waits until it has loaded its append-only file. Its log is in the error
// when it cannot start (the port was taken meanwhile, most likely).
func (s *Server) Restart() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		s.t.Fatal("redisstorage: Restart of a server that is running")
	}
	var lastErr string
	for range 3 {
		p, errText := launch(s.bin, s.port, s.dir, true)
		if p != nil {
			s.proc = p
			return
		}
		lastErr = errText
		time.Sleep(100 * time.Millisecond)
	}
	s.t.Fatalf("redis-server did not start again on %s: %s", s.Addr(), lastErr)
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
