package testproc

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"testing"
	"time"
)

// ErrExited is WaitHTTP's error when the process exited while it waited.
var ErrExited = errors.New("the process exited")

// Proc is a started process. Its Done channel is closed once it has exited
// and been waited for.
type Proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // cmd.Wait's, once done is closed
}

// Launch starts cmd and returns it running; the caller stops it (Kill or
// Stop). On Linux the kernel kills it (SIGKILL) should the test process
// die first (a test timeout), so that nothing is left running.
//
// Output that goes to an *os.File is written by the process itself: the
// caller may close its own copy of the file once Launch returns.
func Launch(cmd *exec.Cmd) (*Proc, error) {
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Proc{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Start is Launch for a test: it fails the test when cmd does not start,
// and kills the process (SIGKILL) when the test ends.
func Start(t testing.TB, cmd *exec.Cmd) *Proc {
	t.Helper()
	p, err := Launch(cmd)
	if err != nil {
		t.Fatalf("starting %s: %v", cmd.Path, err)
	}
	t.Cleanup(p.Kill)
	return p
}

// Cmd is the command the process runs.
func (p *Proc) Cmd() *exec.Cmd { return p.cmd }

// Pid is the process's id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Done is closed once the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is how the process exited (exec.Cmd.Wait's error), once it has; nil
// while it runs.
func (p *Proc) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.err
}

// Kill ends the process with SIGKILL, as a crash would (no cleanup), and
// waits until it is gone. Killing an exited process does nothing.
func (p *Proc) Kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Stop sends sig (syscall.SIGTERM, as Kubernetes does, or os.Interrupt)
// and waits until the process exits. When it has not exited within that
// time Stop kills it (SIGKILL) and returns an error saying so. Stopping an
// exited process does nothing.
func (p *Proc) Stop(sig os.Signal, within time.Duration) error {
	if p.Exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(sig)
	timer := time.NewTimer(within)
	defer timer.Stop()
	select {
	case <-p.done:
		return nil
	case <-timer.C:
		p.Kill()
		return fmt.Errorf("%s did not stop within %v of %v: killed", p.cmd.Path, within, sig)
	}
}

// readyClient bounds each of WaitHTTP's requests.
var readyClient = &http.Client{Timeout: 5 * time.Second}

// WaitHTTP polls GET url until it answers 200 OK (Caddy's admin endpoint's
// /config/ once Caddy serves). It returns ErrExited when the process exits
// meanwhile, and an error when within passes first.
func (p *Proc) WaitHTTP(url string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		if p.Exited() {
			return ErrExited
		}
		if resp, err := readyClient.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no 200 from %s within %v", url, within)
		}
		time.Sleep(25 * time.Millisecond)
	}
}
