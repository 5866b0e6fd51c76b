package testproc

import (
	"bufio"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// ping sends PING on c and reads the answer.
func ping(c net.Conn) (string, error) {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return "", err
	}
	return bufio.NewReader(c).ReadString('\n')
}

func dial(addr string) (net.Conn, error) { return net.DialTimeout("tcp", addr, 2*time.Second) }

// Through the relay a client reaches Redis; Cut ends its connection and
// refuses new ones while Redis runs on; Restore lets clients in again on
// the same address.
func TestRelayCutAndRestore(t *testing.T) {
	r := StartRedis(t, RedisConfig{})
	relay := StartRelay(t, r.Addr())
	if relay.Target() != r.Addr() || relay.Addr() == r.Addr() {
		t.Fatalf("relay %s to %s", relay.Addr(), relay.Target())
	}
	live, err := dial(relay.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	if got, err := ping(live); got != "+PONG\r\n" {
		t.Fatalf("PING through the relay: %q, %v", got, err)
	}

	relay.Cut()
	if got, err := ping(live); err == nil {
		t.Errorf("PING on a cut connection: %q", got)
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("a cut connection hangs instead of closing: %v", err)
	}
	if c, err := dial(relay.Addr()); err == nil {
		c.Close()
		t.Error("a new connection through a cut relay was accepted")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("a new connection through a cut relay: %v, want refused", err)
	}
	direct, err := dial(r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	if got, err := ping(direct); got != "+PONG\r\n" {
		t.Errorf("Redis itself, past the cut relay: %q, %v", got, err)
	}
	relay.Cut() // again: nothing

	if err := relay.Restore(); err != nil {
		t.Fatal(err)
	}
	if err := relay.Restore(); err != nil {
		t.Errorf("Restore of a restored relay: %v", err)
	}
	again, err := dial(relay.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if got, err := ping(again); got != "+PONG\r\n" {
		t.Fatalf("PING through the restored relay: %q, %v", got, err)
	}
}

// With the target down, a connection through the relay is closed.
func TestRelayTargetDown(t *testing.T) {
	r := StartRedis(t, RedisConfig{})
	relay := StartRelay(t, r.Addr())
	r.Kill()
	c, err := dial(relay.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := ping(c); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("PING through the relay to a killed Redis: %q, %v; want the connection closed", got, err)
	}
}

// MuteSubscribers drops what Redis sends a subscriber, and only that: a
// message published meanwhile never reaches it, one published after is
// read whole, and a plain connection's commands go on throughout.
func TestRelayMutesSubscribers(t *testing.T) {
	r := StartRedis(t, RedisConfig{})
	relay := StartRelay(t, r.Addr())
	sub, err := dial(relay.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	subR := bufio.NewReader(sub)
	sub.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := sub.Write([]byte("SUBSCRIBE ch\r\n")); err != nil {
		t.Fatal(err)
	}
	for range 6 { // *3 $9 subscribe $2 ch :1
		if _, err := subR.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
	}
	cmd, err := dial(relay.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer cmd.Close()
	cmdR := bufio.NewReader(cmd)
	publish := func(msg string) {
		t.Helper()
		cmd.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := cmd.Write([]byte("PUBLISH ch " + msg + "\r\n")); err != nil {
			t.Fatal(err)
		}
		if got, err := cmdR.ReadString('\n'); got != ":1\r\n" {
			t.Fatalf("PUBLISH through the relay: %q, %v", got, err)
		}
	}

	relay.MuteSubscribers(true)
	publish("lost")
	time.Sleep(200 * time.Millisecond)
	relay.MuteSubscribers(false)
	publish("kept")
	var got []string
	for range 7 { // *3 $7 message $2 ch $4 kept
		line, err := subR.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the subscription: %v (so far %q)", err, got)
		}
		got = append(got, line)
	}
	if got[6] != "kept\r\n" {
		t.Errorf("the subscriber read %q, want only the message published after the mute", got)
	}
}
