package clock

import (
	"sync"
	"testing"
	"time"
)

func TestClockMoves(t *testing.T) {
	var zero Clock
	if d := zero.Now().Sub(time.Now()); d > time.Second || d < -time.Second {
		t.Fatalf("zero Clock is %v off real time", d)
	}
	var nilClock *Clock
	if d := nilClock.Now().Sub(time.Now()); d > time.Second || d < -time.Second {
		t.Fatalf("nil Clock is %v off real time", d)
	}
	c := New()
	c.Advance(time.Hour)
	if d := c.Now().Sub(time.Now()); d < time.Hour-time.Second || d > time.Hour+time.Second {
		t.Fatalf("after Advance(1h) the clock is %v ahead, want about 1h", d)
	}
	c.Advance(-30 * time.Minute)
	if c.Offset() != 30*time.Minute {
		t.Fatalf("Offset = %v, want 30m", c.Offset())
	}
	c.Set(-time.Minute)
	if d := time.Now().Sub(c.Now()); d < time.Minute-time.Second || d > time.Minute+time.Second {
		t.Fatalf("after Set(-1m) the clock is %v behind, want about 1m", d)
	}
	c.Reset()
	if c.Offset() != 0 {
		t.Fatalf("Offset after Reset = %v, want 0", c.Offset())
	}
}

func TestClockRaceFree(t *testing.T) {
	c := New()
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(2)
		go func() { defer wg.Done(); c.Advance(time.Millisecond) }()
		go func() { defer wg.Done(); _ = c.Now() }()
	}
	wg.Wait()
	if c.Offset() != 4*time.Millisecond {
		t.Fatalf("Offset = %v, want 4ms", c.Offset())
	}
}

func TestNowAllocatesNothing(t *testing.T) {
	c := New()
	if n := testing.AllocsPerRun(100, func() { _ = c.Now() }); n != 0 {
		t.Fatalf("Now allocates %v times, want 0", n)
	}
}
