package testproc

import (
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"
)

// FreePort finds a free port on 127.0.0.1 by listening and closing, so
// another process may take it before the caller does: callers that can,
// retry (StartRedis does).
func FreePort(t testing.TB) int {
	t.Helper()
	port, err := PickPort()
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	return port
}

// PickPort is FreePort without a test.
func PickPort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Addr is 127.0.0.1:port.
func Addr(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// pollEvery is how often WaitFor and Poll try.
const pollEvery = 20 * time.Millisecond

// WaitFor polls cond every 20 ms until it holds, and returns how long that
// took; it fails the test ("what: not within ...") when within passes
// first.
func WaitFor(t testing.TB, what string, within time.Duration, cond func() bool) time.Duration {
	t.Helper()
	took, err := Poll(within, cond)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return took
}

// Poll is WaitFor without a test: it returns how long cond took to hold,
// or an error when within passed first.
func Poll(within time.Duration, cond func() bool) (time.Duration, error) {
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			return time.Since(start), fmt.Errorf("not within %v", within)
		}
		time.Sleep(pollEvery)
	}
	return time.Since(start), nil
}
