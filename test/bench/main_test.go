package main

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// At a fixed rate, requests go to the targets in turn, each target sees
// every tenant (not just every other one), and the rate is kept.
func TestLoadAlternatesTargetsOverAllTenants(t *testing.T) {
	var mu sync.Mutex
	seen := []map[string]int{{}, {}}
	var urls []string
	for i := range seen {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			seen[i][r.Header.Get("X-Fortnox-Tenant")]++
			mu.Unlock()
		}))
		defer srv.Close()
		urls = append(urls, srv.URL)
	}
	tenants := []string{"1", "2", "3", "4"}
	res := load(urls, tenants, 8, 500*time.Millisecond, 400, "")
	for i, r := range res {
		if r.errors > 0 {
			t.Fatalf("target %d: %d errors: %v", i, r.errors, r.firstErr)
		}
		if len(seen[i]) != len(tenants) {
			t.Errorf("target %d saw tenants %v, want all of %v", i, seen[i], tenants)
		}
		// 400 req/s in all for 0.5 s: about 100 each.
		if n := len(r.latencies); n < 80 || n > 110 {
			t.Errorf("target %d: %d requests, want about 100", i, n)
		}
	}
}

func TestMedianAndPercentile(t *testing.T) {
	if m := median([]float64{5, 1, 3}); m != 3 {
		t.Errorf("median = %v, want 3", m)
	}
	l := &loadResult{}
	for i := 100; i >= 1; i-- {
		l.latencies = append(l.latencies, time.Duration(i)*time.Microsecond)
	}
	if p := l.pct(50); p != 50 {
		t.Errorf("p50 = %v, want 50", p)
	}
	if p := l.pct(99); p != 99 {
		t.Errorf("p99 = %v, want 99", p)
	}
}

// The limiter comparison counts the commands a sidecar sends, not those
// its Lua script runs inside Redis.
func TestMonitorCommand(t *testing.T) {
	for line, want := range map[string]struct {
		name   string
		client bool
	}{
		`+1796297491.123456 [0 127.0.0.1:40000] "evalsha" "5f0e" "2" "k"` + "\r\n": {"evalsha", true},
		`+1796297491.123457 [0 lua] "LLEN" "k"` + "\r\n":                           {"llen", false},
		`+1796297491.123458 [3 unix:/tmp/redis.sock] "ping"` + "\r\n":              {"ping", true},
		"garbage\r\n": {"", false},
	} {
		name, client := monitorCommand(line)
		if name != want.name || client != want.client {
			t.Errorf("%q: %q %v, want %q %v", line, name, client, want.name, want.client)
		}
	}
}

func TestParseCommandStats(t *testing.T) {
	info := "# Commandstats\r\ncmdstat_get:calls=3,usec=6,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_evalsha:calls=12345,usec=66,usec_per_call=66.00,rejected_calls=0,failed_calls=0\r\n"
	got, err := parseCommandStats(info)
	if err != nil || got["get"] != 3 || got["evalsha"] != 12345 || len(got) != 2 {
		t.Errorf("%v %v", got, err)
	}
	if _, err := parseCommandStats("cmdstat_get:calls=x,usec=1\r\n"); err == nil {
		t.Error("a broken line was read")
	}
	if s := perRequest(map[string]int64{"evalsha": 2000, "ping": 1}, 2000); s != "evalsha 1.000, ping 0.001" {
		t.Errorf("perRequest: %s", s)
	}
}

// The script comparison reads evalsha's calls and usec.
func TestParseCommandStat(t *testing.T) {
	info := "# Commandstats\r\ncmdstat_get:calls=3,usec=6,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_evalsha:calls=12345,usec=66,usec_per_call=66.00,rejected_calls=0,failed_calls=0\r\n"
	if calls, usec, err := parseCommandStat(info, "evalsha"); err != nil || calls != 12345 || usec != 66 {
		t.Errorf("evalsha: %d %d %v", calls, usec, err)
	}
	if calls, usec, err := parseCommandStat(info, "eval"); err != nil || calls != 0 || usec != 0 {
		t.Errorf("eval (not run): %d %d %v", calls, usec, err)
	}
	if _, _, err := parseCommandStat("cmdstat_evalsha:calls=x,usec=1\r\n", "evalsha"); err == nil {
		t.Error("a broken line was read")
	}
}
