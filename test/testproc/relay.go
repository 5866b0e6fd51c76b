package testproc

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Relay is a TCP relay on 127.0.0.1 in front of another address, for a
// test to cut the network between a client and a server without stopping
// either: Cut closes the live connections and refuses new ones (nothing
// listens on the relay's port), Restore listens again on the same port.
type Relay struct {
	target string
	addr   string

	mu     sync.Mutex
	ln     net.Listener // nil while cut or closed
	gen    int          // counts Cut and Close: a connection of an earlier one is closed
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
	// muted: what Redis sends a subscriber is dropped (MuteSubscribers).
	muted atomic.Bool
}

// StartRelay starts a relay to target on a free 127.0.0.1 port, and closes
// it when the test ends.
func StartRelay(t testing.TB, target string) *Relay {
	t.Helper()
	r, err := NewRelay(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

// NewRelay is StartRelay without a test: the caller closes the relay.
func NewRelay(target string) (*Relay, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &Relay{target: target, addr: ln.Addr().String(), conns: map[net.Conn]struct{}{}}
	r.serve(ln)
	return r, nil
}

// Addr is the relay's host:port, the same after Restore: clients dial it
// instead of the target.
func (r *Relay) Addr() string { return r.addr }

// Target is the address the relay forwards to.
func (r *Relay) Target() string { return r.target }

// Cut closes every live connection through the relay (both ends) and
// stops listening, so that a new connection is refused. Cutting a cut
// relay does nothing.
func (r *Relay) Cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cutLocked()
}

func (r *Relay) cutLocked() {
	r.gen++
	if r.ln != nil {
		r.ln.Close()
		r.ln = nil
	}
	for c := range r.conns {
		c.Close()
	}
	clear(r.conns)
}

// Restore listens again on the relay's port after Cut. It fails only when
// another process took the port meanwhile. Restoring a relay that is not
// cut does nothing.
func (r *Relay) Restore() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return errors.New("testproc: Restore of a closed relay")
	}
	if r.ln != nil {
		return nil
	}
	ln, err := net.Listen("tcp", r.addr)
	if err != nil {
		return err
	}
	r.serve(ln)
	return nil
}

// Close cuts the relay for good and waits for its goroutines.
func (r *Relay) Close() {
	r.mu.Lock()
	r.closed = true
	r.cutLocked()
	r.mu.Unlock()
	r.wg.Wait()
}

// serve accepts on ln until it is closed; r.mu is held or r is new.
func (r *Relay) serve(ln net.Listener) {
	r.ln = ln
	gen := r.gen
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed by Cut or Close
			}
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				r.relay(c, gen)
			}()
		}
	}()
}

// track adds c to the live connections, or closes it and returns false
// when the relay was cut since gen.
func (r *Relay) track(c net.Conn, gen int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.gen != gen {
		c.Close()
		return false
	}
	r.conns[c] = struct{}{}
	return true
}

func (r *Relay) untrack(cs ...net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range cs {
		delete(r.conns, c)
		c.Close()
	}
}

// relay copies between the client c and a new connection to the target
// until either side ends, then closes both.
func (r *Relay) relay(c net.Conn, gen int) {
	if !r.track(c, gen) {
		return
	}
	up, err := net.DialTimeout("tcp", r.target, 5*time.Second)
	if err != nil {
		r.untrack(c) // the target is down: so is the relay's connection
		return
	}
	if !r.track(up, gen) {
		r.untrack(c)
		return
	}
	done := make(chan struct{}, 2)
	var subscriber atomic.Bool
	go func() { _, _ = io.Copy(up, subscriberWatch{c, &subscriber}); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, muting{up, &subscriber, &r.muted}); done <- struct{}{} }()
	<-done
	r.untrack(c, up) // ends the other copy
	<-done
}

// MuteSubscribers drops what the target sends on the connections that
// subscribed (SUBSCRIBE), while on, and nothing else: a pub/sub message
// is lost on its way to the client, which neither side notices (keep it
// shorter than the client's health check of the subscription). Commands
// on the other connections go on.
func (r *Relay) MuteSubscribers(on bool) { r.muted.Store(on) }

// subscriberWatch reads a client's connection and notes when it
// subscribes.
type subscriberWatch struct {
	c   net.Conn
	sub *atomic.Bool
}

func (w subscriberWatch) Read(p []byte) (int, error) {
	n, err := w.c.Read(p)
	if n > 0 && !w.sub.Load() && bytes.Contains(bytes.ToLower(p[:n]), []byte("subscribe")) {
		w.sub.Store(true)
	}
	return n, err
}

// muting reads the target's connection, dropping what it reads while the
// client is a subscriber and the relay is muted.
type muting struct {
	up         net.Conn
	sub, muted *atomic.Bool
}

func (m muting) Read(p []byte) (int, error) {
	for {
		n, err := m.up.Read(p)
		if err != nil || n == 0 || !m.sub.Load() || !m.muted.Load() {
			return n, err
		}
	}
}
