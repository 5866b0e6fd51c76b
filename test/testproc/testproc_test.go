package testproc

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// TestMain runs the tests, or, started by TestLaunchedProcessDiesWithParent
// with orphanEnv set, the parent it kills.
func TestMain(m *testing.M) {
	if os.Getenv(orphanEnv) != "" {
		launchAndWait()
		return
	}
	if !CheckBinaries("test/testproc: the helpers' tests against real redis-server processes", "redis-server", "redis-cli") {
		os.Exit(1)
	}
	os.Exit(m.Run())
}

const orphanEnv = "TESTPROC_ORPHAN_PARENT"

// launchAndWait launches a long sleep, prints its pid, and waits to be
// killed.
func launchAndWait() {
	p, err := Launch(exec.Command("sleep", "60"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "orphan parent:", err)
		os.Exit(2)
	}
	fmt.Println(p.Pid())
	select {}
}

// shell launches sh -c script.
func shell(t *testing.T, script string) *Proc {
	t.Helper()
	return Start(t, exec.Command("sh", "-c", script))
}

// shellUp launches sh -c script and waits until it says "up" on its
// standard output (once it has set its traps).
func shellUp(t *testing.T, script string) *Proc {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command("sh", "-c", script)
	cmd.Stdout = w
	p := Start(t, cmd)
	w.Close() // the shell has its own copy
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := bufio.NewReader(r).ReadString('\n'); line != "up\n" {
		t.Fatalf("the shell said %q, %v", line, err)
	}
	return p
}

func TestStopAndKill(t *testing.T) {
	t.Run("SIGTERM handled", func(t *testing.T) {
		p := shellUp(t, `trap 'exit 0' TERM; echo up; while :; do sleep 0.05; done`)
		if err := p.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		if !p.Exited() || p.Err() != nil {
			t.Errorf("after Stop: exited %v, err %v; want a clean exit", p.Exited(), p.Err())
		}
		if err := p.Stop(syscall.SIGTERM, time.Second); err != nil {
			t.Errorf("Stop of a stopped process: %v", err)
		}
	})
	t.Run("SIGTERM ignored", func(t *testing.T) {
		p := shellUp(t, `trap '' TERM; echo up; while :; do sleep 0.05; done`)
		start := time.Now()
		err := p.Stop(syscall.SIGTERM, 300*time.Millisecond)
		if err == nil || !strings.Contains(err.Error(), "did not stop within 300ms") {
			t.Fatalf("Stop of a process that ignores SIGTERM: %v", err)
		}
		if !p.Exited() || time.Since(start) > 5*time.Second {
			t.Errorf("not killed after the deadline (exited %v after %v)", p.Exited(), time.Since(start))
		}
		var exit *exec.ExitError
		if !errors.As(p.Err(), &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("exit %v, want killed by SIGKILL", p.Err())
		}
	})
	t.Run("Kill", func(t *testing.T) {
		p := shell(t, `while :; do sleep 0.05; done`)
		if p.Exited() || p.Err() != nil {
			t.Fatal("exited at once")
		}
		p.Kill()
		if !p.Exited() {
			t.Fatal("Kill returned before the process exited")
		}
		p.Kill() // again: nothing
	})
}

func TestWaitHTTP(t *testing.T) {
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) < 3 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	running := shell(t, `sleep 30`)
	if err := running.WaitHTTP(srv.URL, 5*time.Second); err != nil || calls.Load() != 3 {
		t.Fatalf("WaitHTTP = %v after %d calls; want nil after the third", err, calls.Load())
	}

	closed := fmt.Sprintf("http://127.0.0.1:%d/", FreePort(t))
	if err := running.WaitHTTP(closed, 200*time.Millisecond); err == nil || errors.Is(err, ErrExited) {
		t.Errorf("WaitHTTP on a closed port = %v; want a timeout", err)
	}
	exited := shell(t, `exit 3`)
	if err := exited.WaitHTTP(closed, 10*time.Second); !errors.Is(err, ErrExited) {
		t.Errorf("WaitHTTP of an exited process = %v; want ErrExited", err)
	}
}

// A process launched by a process that is killed (a test binary at its
// timeout) is killed too, on Linux.
func TestLaunchedProcessDiesWithParent(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("needs Linux's Pdeathsig")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), orphanEnv+"=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	parent := Start(t, cmd)
	var pid int
	if _, err := fmt.Fscan(bufio.NewReader(out), &pid); err != nil {
		t.Fatalf("the parent's child pid: %v", err)
	}
	if !alive(pid) {
		t.Fatalf("the child %d is not running", pid)
	}
	parent.Kill()
	WaitFor(t, "the child killed with its parent", 5*time.Second, func() bool { return !alive(pid) })
}

// alive reports whether pid runs (a zombie does not).
func alive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...
	_, rest, _ := strings.Cut(string(stat), ") ")
	return !strings.HasPrefix(rest, "Z") && !strings.HasPrefix(rest, "X")
}

func TestPollAndWaitFor(t *testing.T) {
	n := 0
	if took := WaitFor(t, "three polls", time.Second, func() bool { n++; return n == 3 }); took < 2*pollEvery {
		t.Errorf("three polls took %v, want two pauses of %v", took, pollEvery)
	}
	start := time.Now()
	if _, err := Poll(100*time.Millisecond, func() bool { return false }); err == nil || err.Error() != "not within 100ms" {
		t.Errorf("Poll of a false condition = %v", err)
	}
	if d := time.Since(start); d < 100*time.Millisecond || d > time.Second {
		t.Errorf("Poll gave up after %v, want 100ms", d)
	}
}

func TestFreePort(t *testing.T) {
	a, b := FreePort(t), FreePort(t)
	if a == 0 || b == 0 || Addr(a) != fmt.Sprintf("127.0.0.1:%d", a) {
		t.Fatalf("ports %d %d, Addr %s", a, b, Addr(a))
	}
}

func TestStartFake(t *testing.T) {
	var fake *fakefortnox.Server
	t.Run("started", func(t *testing.T) {
		fake = StartFake(t, fakefortnox.Options{Clients: map[string]string{"c": "s"}, RateLimit: -1})
		resp, err := http.Get(fake.URL() + "/3/companyinformation")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("without a token: %d, want 401", resp.StatusCode)
		}
	})
	// Closed with the subtest.
	client := &http.Client{Timeout: 2 * time.Second}
	if resp, err := client.Get(fake.URL() + "/3/companyinformation"); err == nil {
		resp.Body.Close()
		t.Error("the fake still answers after its test ended")
	}
}

func TestAnnounceSkip(t *testing.T) {
	var out, tty bytes.Buffer
	terminal := func() io.WriteCloser { return nopCloser{&tty} }
	if !announceSkip(&out, terminal, false, "test/x: the Redis tests", "redis-server is not on PATH (apt-get install redis-server)") {
		t.Error("outside CI a skip is allowed")
	}
	want := "SKIP test/x: the Redis tests: redis-server is not on PATH (apt-get install redis-server)\n"
	if out.String() != want || tty.String() != want {
		t.Errorf("stdout %q, terminal %q; want both %q", out.String(), tty.String(), want)
	}

	out.Reset()
	tty.Reset()
	if announceSkip(&out, terminal, true, "test/x: the Redis tests", "redis-server is not on PATH") {
		t.Error("in CI a skip must not be allowed")
	}
	if got := out.String(); !strings.HasPrefix(got, "FAIL test/x: the Redis tests: redis-server is not on PATH, and CI must run every test") {
		t.Errorf("in CI: %q", got)
	}

	out.Reset()
	if !announceSkip(&out, func() io.WriteCloser { return nil }, false, "g", "r") || out.String() != "SKIP g: r\n" {
		t.Errorf("without a terminal: %q", out.String())
	}
}

func TestInCI(t *testing.T) {
	for v, want := range map[string]bool{"": false, "0": false, "false": false, "FALSE": false, "true": true, "1": true, "yes": true} {
		t.Setenv("CI", v)
		if got := InCI(); got != want {
			t.Errorf("CI=%q: InCI() = %v", v, got)
		}
	}
}

func TestInstallHint(t *testing.T) {
	for name, want := range map[string]string{"redis-cli": "apt-get install redis-tools", "redis-server": "apt-get install redis-server", "jq": "apt-get install jq"} {
		if got := installHint(name); got != want {
			t.Errorf("installHint(%q) = %q, want %q", name, got, want)
		}
	}
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// testContext bounds a test's own Redis call.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}
