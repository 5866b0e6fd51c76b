// Command bench compares the sidecar with a plain Caddy reverse_proxy, in
// one run, on this machine, against the same local upstream:
//
//	(a) plain: reverse_proxy with a static `Authorization: Bearer …` (header_up)
//	(b) fortnox: the plugin with cached tokens, many tenants, rate limit off
//
// It runs a b a b … (rounds), each at (i) full speed with fixed concurrency
// and (ii) a fixed, moderate request rate, and prints requests/s, p50 and
// p99 for both and the ratios b/a (medians over the rounds). Everything
// listens on 127.0.0.1; every run is bounded in time.
//
//	go run ./test/bench                 # builds ./caddy with xcaddy.sh first
//	go run ./test/bench -caddy ./caddy -rounds 5 -duration 5s -rate 2000
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

func main() {
	caddyBin := flag.String("caddy", "", "Caddy binary with the plugin (default: build ./caddy with ./xcaddy.sh)")
	rounds := flag.Int("rounds", 3, "a/b rounds")
	duration := flag.Duration("duration", 4*time.Second, "length of each measurement")
	concurrency := flag.Int("c", 16, "concurrent connections for the full-speed run")
	rate := flag.Int("rate", 1000, "requests per second for the fixed-rate run")
	tenants := flag.Int("tenants", 100, "tenants the requests are spread over")
	flag.Parse()
	if err := run(*caddyBin, *rounds, *duration, *concurrency, *rate, *tenants); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(caddyBin string, rounds int, duration time.Duration, concurrency, rate, tenants int) error {
	if caddyBin == "" {
		build := exec.Command("./xcaddy.sh")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("building caddy (run from the repository root): %w", err)
		}
		caddyBin = "./caddy"
	}
	caddyBin, _ = filepath.Abs(caddyBin)

	// The upstream: a small JSON answer, like a Fortnox GET. It is the same
	// for both configs and never the bottleneck.
	upstream, err := listen()
	if err != nil {
		return err
	}
	body := []byte(`{"CompanyInformation":{"CompanyName":"Bench","DatabaseNumber":1234567}}`)
	go http.Serve(upstream, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") == "" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	}))

	// The token endpoint for (b): the fake Fortnox, asked once per tenant.
	fake, err := fakefortnox.Start(fakefortnox.Options{Clients: map[string]string{"bench": "bench-secret"}, RateLimit: -1})
	if err != nil {
		return err
	}
	defer fake.Close()
	ids := make([]string, tenants)
	for i := range ids {
		ids[i] = strconv.Itoa(2000000 + i)
		fake.GrantConsent("bench", ids[i])
	}

	dir, err := os.MkdirTemp("", "fortnox-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	upstreamURL := "http://" + upstream.Addr().String()
	configs := []struct {
		name, site string
	}{
		{"a plain reverse_proxy", fmt.Sprintf("reverse_proxy %s {\n\t\theader_up Authorization \"Bearer static-benchmark-token\"\n\t}", upstreamURL)},
		{"b fortnox", fmt.Sprintf("fortnox {\n\t\tclient_id bench\n\t\tclient_secret bench-secret\n\t\ttoken_url %s\n\t\trate_limit off\n\t}\n\treverse_proxy %s", fake.TokenURL(), upstreamURL)},
	}

	type result struct{ rps, p50, p99, fixedP50, fixedP99 float64 }
	results := make([][]result, len(configs))
	for round := 0; round < rounds; round++ {
		for i, cfg := range configs {
			srv, err := startCaddy(caddyBin, dir, cfg.site)
			if err != nil {
				return err
			}
			// Warm up: every tenant's token is cached, connections are open.
			full := load(srv.url, ids, concurrency, time.Second, 0)
			if full.errors > 0 {
				srv.stop()
				return fmt.Errorf("%s: %d errors while warming up (first: %v)", cfg.name, full.errors, full.firstErr)
			}
			full = load(srv.url, ids, concurrency, duration, 0)
			fixed := load(srv.url, ids, concurrency*4, duration, rate)
			srv.stop()
			if full.errors+fixed.errors > 0 {
				return fmt.Errorf("%s: %d errors (first: %v)", cfg.name, full.errors+fixed.errors, firstNonNil(full.firstErr, fixed.firstErr))
			}
			r := result{full.rps(), full.pct(50), full.pct(99), fixed.pct(50), fixed.pct(99)}
			results[i] = append(results[i], r)
			fmt.Printf("round %d %-22s %8.0f req/s  p50 %7.1fµs  p99 %7.1fµs | at %d req/s: p50 %7.1fµs  p99 %7.1fµs\n",
				round+1, cfg.name, r.rps, r.p50, r.p99, rate, r.fixedP50, r.fixedP99)
		}
	}

	med := func(rs []result, f func(result) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	get := []func(result) float64{
		func(r result) float64 { return r.rps }, func(r result) float64 { return r.p50 }, func(r result) float64 { return r.p99 },
		func(r result) float64 { return r.fixedP50 }, func(r result) float64 { return r.fixedP99 },
	}
	var a, b [5]float64
	for k, f := range get {
		a[k], b[k] = med(results[0], f), med(results[1], f)
	}
	fmt.Printf("\nmedians over %d rounds (%d tenants, %v per run, %d connections at full speed)\n", rounds, tenants, duration, concurrency)
	fmt.Printf("%-24s %10s %10s %10s %14s %14s\n", "", "req/s", "p50 µs", "p99 µs", "p50@rate µs", "p99@rate µs")
	fmt.Printf("%-24s %10.0f %10.1f %10.1f %14.1f %14.1f\n", configs[0].name, a[0], a[1], a[2], a[3], a[4])
	fmt.Printf("%-24s %10.0f %10.1f %10.1f %14.1f %14.1f\n", configs[1].name, b[0], b[1], b[2], b[3], b[4])
	fmt.Printf("ratio b/a: throughput %.3f; p99 added at %d req/s: %+.1fµs; p50 added: %+.1fµs\n",
		b[0]/a[0], rate, b[4]-a[4], b[3]-a[3])
	return nil
}

func firstNonNil(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

func listen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

type caddyServer struct {
	cmd *exec.Cmd
	url string
}

func startCaddy(bin, dir, site string) (*caddyServer, error) {
	ln, err := listen()
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	cfg := filepath.Join(dir, "Caddyfile")
	caddyfile := fmt.Sprintf("{\n\tadmin off\n\tpersist_config off\n\tstorage file_system %s\n\tlog {\n\t\tlevel ERROR\n\t}\n}\n\nhttp://127.0.0.1:%d {\n\tbind 127.0.0.1\n\t%s\n}\n",
		filepath.Join(dir, "storage"), port, site)
	if err := os.WriteFile(cfg, []byte(caddyfile), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "run", "--config", cfg, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &caddyServer{cmd: cmd, url: fmt.Sprintf("http://127.0.0.1:%d/3/companyinformation", port)}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			c.Close()
			return s, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.stop()
	return nil, errors.New("caddy did not start")
}

func (s *caddyServer) stop() {
	_ = s.cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = s.cmd.Process.Kill()
		<-done
	}
}

type loadResult struct {
	latencies []time.Duration
	took      time.Duration
	errors    int64
	firstErr  error
}

func (l *loadResult) rps() float64 { return float64(len(l.latencies)) / l.took.Seconds() }

// pct is the p-th percentile latency in microseconds.
func (l *loadResult) pct(p float64) float64 {
	if len(l.latencies) == 0 {
		return 0
	}
	sort.Slice(l.latencies, func(i, j int) bool { return l.latencies[i] < l.latencies[j] })
	i := int(float64(len(l.latencies)-1) * p / 100)
	return float64(l.latencies[i].Nanoseconds()) / 1e3
}

// load sends requests for duration, spread over the tenants: as fast as
// workers allow when rate is 0, else at a fixed rate (open loop: requests
// are sent on schedule, and latency counts from the scheduled time).
func load(url string, tenants []string, workers int, duration time.Duration, rate int) *loadResult {
	transport := &http.Transport{MaxIdleConnsPerHost: workers, MaxConnsPerHost: workers}
	client := &http.Client{Transport: transport, Timeout: 10 * time.Second}
	defer transport.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()

	var mu sync.Mutex
	res := &loadResult{}
	var seq atomic.Int64
	one := func(scheduled time.Time) {
		n := seq.Add(1)
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("X-Fortnox-Tenant", tenants[int(n)%len(tenants)])
		resp, err := client.Do(req)
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err == nil && resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
		}
		lat := time.Since(scheduled)
		mu.Lock()
		if err != nil {
			res.errors++
			if res.firstErr == nil {
				res.firstErr = err
			}
		} else {
			res.latencies = append(res.latencies, lat)
		}
		mu.Unlock()
	}

	start := time.Now()
	var wg sync.WaitGroup
	if rate == 0 {
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					one(time.Now())
				}
			}()
		}
	} else {
		jobs := make(chan time.Time, workers)
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for scheduled := range jobs {
					one(scheduled)
				}
			}()
		}
		interval := time.Second / time.Duration(rate)
		for next := start; ctx.Err() == nil; next = next.Add(interval) {
			time.Sleep(time.Until(next))
			jobs <- next
		}
		close(jobs)
	}
	wg.Wait()
	res.took = time.Since(start)
	return res
}
