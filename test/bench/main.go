// Command bench compares the sidecar with a plain Caddy reverse_proxy, in
// one run, on this machine, against the same local upstream:
//
//	(a) plain: reverse_proxy with a static `Authorization: Bearer …` (header_up)
//	(b) fortnox: the plugin with cached tokens, many tenants, rate limit off
//
// Each round starts both Caddy processes afresh, warms them (b fetches one
// token per tenant from the fake Fortnox, and must fetch no more), then
// measures:
//
//	(i)  full speed with fixed concurrency: a alone, then b alone;
//	(ii) a moderate fixed rate, open loop, latency counted from each
//	     request's scheduled time: requests go to a and b in turn (a b a b …,
//	     half the rate each), so that both see the same moments of a noisy
//	     machine and the difference of their latencies is the plugin's.
//
// It prints requests/s, p50 and p99 for both, per round and as medians
// over the rounds, with the throughput ratio b/a and the latency b adds.
// Both send a token of the same size (one minted by the fake Fortnox,
// about 3 KB like Fortnox's), so the comparison is the plugin's cost and
// not the header's size. Everything listens on 127.0.0.1; every run is
// bounded in time (about 15 s a round: 75 s with the defaults, plus the build).
//
// With -compare limiter it compares instead, on the same footing:
//
//	(a) fortnox with its rate limiter in process (rate_limit 25 5s)
//	(b) the same in cluster mode (redis <url>): the limiter in Redis
//
// against a redis-server it starts on 127.0.0.1 (-appendfsync always by
// default, as the docs recommend), with 5,000 tenants so that no tenant
// comes near its budget and neither limiter makes a request wait. It adds
// redis-server's CPU per request and, each round, the Redis commands per
// cached request through (b): those the sidecar sent (MONITOR) and all
// that ran (INFO commandstats, which counts the script's own commands).
// Before the rounds it compares the limiter's Lua script itself (-scripts
// calls of each, straight to Redis; see scripts.go): as it ships, as it
// was before issue 6, and a bare one-command EVALSHA, interleaved, with
// Redis's CPU per call and the p50/p99 round trip, as ratios to the bare
// one. -rounds 0 runs only that, without Caddy (nor the build).
//
//	go run ./test/bench                 # builds ./caddy with ./xcaddy.sh first
//	go run ./test/bench -caddy ./caddy -rounds 3 -duration 3s -rate 2000
//	go run ./test/bench -cpuprofile /tmp/prof   # CPU profiles of round 1's full-speed runs
//	go run ./test/bench -compare limiter [-appendfsync always|everysec|off]
//	go run ./test/bench -compare limiter -rounds 0 -scripts 10000   # the script comparison alone
//	go run ./test/bench -compare clients -scripts 20000   # go-redis against rueidis (clients.go)
//	go tool pprof -top -diff_base /tmp/prof/a.pprof ./caddy /tmp/prof/b.pprof
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

type options struct {
	caddyBin    string
	rounds      int
	duration    time.Duration
	concurrency int
	rate        int
	tenants     int
	profileDir  string
	compare     string // proxy or limiter
	appendfsync string // limiter: Redis's persistence
	commands    int    // limiter: requests for the Redis command count
	scripts     int    // limiter: calls of each script in the script comparison
}

func main() {
	var o options
	flag.StringVar(&o.caddyBin, "caddy", "", "Caddy binary with the plugin (default: build ./caddy with ./xcaddy.sh)")
	flag.IntVar(&o.rounds, "rounds", 5, "rounds (each measures a and b)")
	flag.DurationVar(&o.duration, "duration", 4*time.Second, "length of each measurement")
	flag.IntVar(&o.concurrency, "c", 16, "concurrent connections for the full-speed runs")
	flag.IntVar(&o.rate, "rate", 2000, "requests per second in all for the fixed-rate run (half to a, half to b)")
	flag.IntVar(&o.tenants, "tenants", 100, "tenants the requests are spread over")
	flag.StringVar(&o.profileDir, "cpuprofile", "", "write CPU profiles of round 1's full-speed slices (a.pprof, b.pprof) to this directory")
	flag.StringVar(&o.compare, "compare", "proxy", "proxy: (a) plain reverse_proxy, (b) fortnox; limiter: (a) fortnox with its rate limiter in process, (b) the same in cluster mode, the limiter in Redis; clients: go-redis against rueidis, straight to Redis (no Caddy; -scripts calls each)")
	flag.StringVar(&o.appendfsync, "appendfsync", "always", "-compare limiter: Redis's append-only file fsync policy, always (what the docs recommend), everysec, or off (no append-only file)")
	flag.IntVar(&o.commands, "commands", 2000, "-compare limiter: cached requests through (b) over which Redis's commands are counted")
	flag.IntVar(&o.scripts, "scripts", 10000, "-compare limiter: calls of each Lua script (the limiter's, the one before issue 6, a bare one-command script) in the script comparison, straight to Redis; 0: none. With -rounds 0 the bench runs only the script comparison (no Caddy, no build)")
	flag.Parse()
	tenantsSet := false
	flag.Visit(func(f *flag.Flag) { tenantsSet = tenantsSet || f.Name == "tenants" })
	if o.compare == "limiter" && !tenantsSet {
		// Enough that no tenant comes near its budget (25 per 5 s) at
		// full speed: the limiters then count turns and never wait.
		o.tenants = 5000
	}
	if o.compare == "clients" {
		if o.scripts < clientSliceCalls {
			fmt.Fprintf(os.Stderr, "bench: -compare clients needs -scripts >= %d (the calls per client, operation and concurrency)\n", clientSliceCalls)
			os.Exit(2)
		}
		if !tenantsSet {
			o.tenants = 5000
		}
		if err := runClients(o); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	if o.compare == "limiter" && o.rounds == 0 {
		if o.scripts < 1 {
			fmt.Fprintln(os.Stderr, "bench: -rounds 0 needs -scripts >= 1")
			os.Exit(2)
		}
		if err := runScriptsOnly(o); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	if o.rounds < 1 || o.duration < time.Second || o.duration > time.Minute || o.concurrency < 1 || o.rate < 2 || o.tenants < 1 || o.commands < 1 {
		fmt.Fprintln(os.Stderr, "bench: need rounds >= 1, 1s <= duration <= 1m, c >= 1, rate >= 2, tenants >= 1, commands >= 1")
		os.Exit(2)
	}
	if o.compare != "proxy" && o.compare != "limiter" {
		fmt.Fprintln(os.Stderr, "bench: -compare is proxy or limiter")
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// roundResult is one round's measurements of one config.
type roundResult struct {
	cpuPerRequest      float64 // µs of the Caddy process's CPU per request (0: unknown)
	rps, p50, p99      float64 // full speed
	fixedP50, fixedP99 float64 // at the fixed rate
}

func run(o options) error {
	if o.caddyBin == "" {
		build := exec.Command("./xcaddy.sh")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("building caddy (run from the repository root): %w", err)
		}
		o.caddyBin = "./caddy"
	}
	caddyBin, err := filepath.Abs(o.caddyBin)
	if err != nil {
		return err
	}

	// The upstream: a small JSON answer, like a Fortnox GET. It is the same
	// for both configs and never the bottleneck (measured below).
	upstream, err := listen()
	if err != nil {
		return err
	}
	defer upstream.Close()
	body := []byte(`{"CompanyInformation":{"CompanyName":"Bench","DatabaseNumber":1234567}}`)
	go http.Serve(upstream, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer ") {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	}))
	upstreamURL := "http://" + upstream.Addr().String()

	// The token endpoint for (b): the fake Fortnox, asked once per tenant.
	fake, err := fakefortnox.Start(fakefortnox.Options{Clients: map[string]string{"bench": "bench-secret"}, RateLimit: -1})
	if err != nil {
		return err
	}
	defer fake.Close()
	ids := make([]string, o.tenants)
	for i := range ids {
		ids[i] = strconv.Itoa(2000000 + i)
		fake.GrantConsent("bench", ids[i])
	}

	// (a) sends a token just like those (b) gets, so that both carry the
	// same ~3 KB header to the upstream.
	staticToken, err := mintToken(fake.TokenURL(), "bench", "bench-secret", ids[0])
	if err != nil {
		return err
	}
	direct := load([]string{upstreamURL + "/3/companyinformation"}, ids, o.concurrency, time.Second, 0, "Bearer "+staticToken)[0]
	if direct.errors > 0 {
		return fmt.Errorf("upstream alone: %d errors (first: %v)", direct.errors, direct.firstErr)
	}
	fmt.Printf("upstream alone: %.0f req/s at %d connections (the ceiling neither config can pass); token %d bytes; %d tenants\n",
		direct.rps(), o.concurrency, len(staticToken), o.tenants)

	dir, err := os.MkdirTemp("", "fortnox-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if o.profileDir != "" {
		if err := os.MkdirAll(o.profileDir, 0o755); err != nil {
			return err
		}
	}
	fortnox := func(extra string) string {
		return fmt.Sprintf("fortnox {\n\t\tclient_id bench\n\t\tclient_secret bench-secret\n\t\ttoken_url %s\n\t\tcheck_credentials off\n%s\t}\n\treverse_proxy %s", fake.TokenURL(), extra, upstreamURL)
	}
	configs := []struct {
		name, short, site string
		tokens            int // token requests its warm-up makes
	}{
		{"a plain reverse_proxy", "a", fmt.Sprintf("reverse_proxy %s {\n\t\theader_up Authorization \"Bearer %s\"\n\t}", upstreamURL, staticToken), 0},
		{"b fortnox", "b", fortnox("\t\trate_limit off\n"), o.tenants},
	}
	var rs *redisServer
	if o.compare == "limiter" {
		if rs, err = startRedis(dir, o.appendfsync); err != nil {
			return err
		}
		defer rs.stop()
		configs[0].name, configs[0].site, configs[0].tokens = "a limiter in process", fortnox("\t\trate_limit 25 5s\n"), o.tenants
		configs[1].name, configs[1].site = "b limiter in Redis", fortnox("\t\trate_limit 25 5s\n\t\tredis "+rs.url()+"\n")
		fmt.Printf("limiter comparison: both rate_limit 25 5s; (b) with redis at %s, appendfsync %s\n", rs.addr, o.appendfsync)
		if o.scripts > 0 {
			if err := compareScripts(rs, o.scripts, o.tenants); err != nil {
				return err
			}
			fmt.Println()
		}
	}
	wantTokens := 0
	for _, cfg := range configs {
		wantTokens += cfg.tokens
	}

	results := make([][]roundResult, len(configs))
	// All fixed-rate samples of all rounds, per config: a and b were
	// measured in turn throughout, so their pooled percentiles compare.
	pooled := []*loadResult{{}, {}}
	var commandCounts []*commandCount
	var redisCPU []float64 // µs of redis-server's CPU per request through (b)
	for round := range o.rounds {
		if rs != nil {
			if err := rs.flush(); err != nil { // each round's (b) fetches its own tokens, as (a) does
				return err
			}
		}
		servers := make([]*caddyServer, len(configs))
		stopAll := func() {
			for _, s := range servers {
				if s != nil {
					s.stop()
				}
			}
		}
		for i, cfg := range configs {
			srv, err := startCaddy(caddyBin, filepath.Join(dir, cfg.short), cfg.site, o.profileDir != "" && round == 0)
			if err != nil {
				stopAll()
				return fmt.Errorf("%s: %w", cfg.name, err)
			}
			servers[i] = srv
		}
		// Warm up: every tenant's token is cached, connections are open.
		tokensBefore := fake.TokenRequests("", "")
		for i, srv := range servers {
			warm := warmTenants(srv.url, ids, o.concurrency)
			warm.add(load([]string{srv.url}, ids, o.concurrency, time.Second, 0, "")[0])
			if warm.errors > 0 {
				stopAll()
				return fmt.Errorf("%s: %d errors while warming up (first: %v)", configs[i].name, warm.errors, warm.firstErr)
			}
		}
		if n := fake.TokenRequests("", "") - tokensBefore; n != wantTokens {
			stopAll()
			return fmt.Errorf("warming up made %d token requests for %d tenants, want %d", n, o.tenants, wantTokens)
		}
		tokensWarm := fake.TokenRequests("", "")
		var redisCPUBefore time.Duration
		if rs != nil {
			redisCPUBefore = rs.cpu()
		}
		cpuBefore := make([]time.Duration, len(servers))
		for i, srv := range servers {
			cpuBefore[i] = srv.cpu()
		}

		// (i) full speed, one config at a time, in slices of a second:
		// a b a b …, so that both meet the machine's slow moments alike.
		full := make([]*loadResult, len(servers))
		for i := range full {
			full[i] = &loadResult{}
		}
		// Each profile spans all slices: a process idles while the other
		// one runs, so it holds samples of its own slices only.
		var profiled []chan error
		for i, srv := range servers {
			if srv.adminURL != "" {
				done := make(chan error, 1)
				path := filepath.Join(o.profileDir, configs[i].short+".pprof")
				span := time.Duration(sliceCount(o.duration)*len(servers)) * sliceLength
				go func() { done <- srv.cpuProfile(path, span) }()
				profiled = append(profiled, done)
			}
		}
		for range sliceCount(o.duration) {
			for i, srv := range servers {
				full[i].add(load([]string{srv.url}, ids, o.concurrency, sliceLength, 0, "")[0])
			}
		}
		for _, done := range profiled {
			if err := <-done; err != nil {
				stopAll()
				return err
			}
		}
		// (ii) the fixed rate, a and b in turn.
		urls := make([]string, len(servers))
		for i, srv := range servers {
			urls[i] = srv.url
		}
		fixed := load(urls, ids, o.concurrency*4, o.duration, o.rate, "")
		cpuUsed := make([]time.Duration, len(servers))
		for i, srv := range servers {
			if before, after := cpuBefore[i], srv.cpu(); before > 0 && after > before {
				cpuUsed[i] = after - before
			}
		}
		if rs != nil {
			if after := rs.cpu(); redisCPUBefore > 0 && after > redisCPUBefore {
				redisCPU = append(redisCPU, float64((after-redisCPUBefore).Nanoseconds())/1e3/float64(max(1, len(full[1].latencies)+len(fixed[1].latencies))))
			}
			count, err := countRedisCommands(rs, servers[1].url, ids, o.commands)
			if err != nil {
				stopAll()
				return fmt.Errorf("counting Redis commands: %w", err)
			}
			commandCounts = append(commandCounts, count)
		}
		stopAll()

		for i := range configs {
			if n := full[i].errors + fixed[i].errors; n > 0 {
				return fmt.Errorf("%s: %d errors (first: %v)", configs[i].name, n, firstNonNil(full[i].firstErr, fixed[i].firstErr))
			}
		}
		// (b) must have measured the cached path.
		if n := fake.TokenRequests("", "") - tokensWarm; n != 0 {
			return fmt.Errorf("%d token requests while measuring: not the cached path", n)
		}
		for i := range configs {
			pooled[i].add(fixed[i])
			requests := len(full[i].latencies) + len(fixed[i].latencies)
			results[i] = append(results[i], roundResult{
				cpuPerRequest: float64(cpuUsed[i].Nanoseconds()) / 1e3 / float64(max(1, requests)),
				rps:           full[i].rps(),
				p50:           full[i].pct(50),
				p99:           full[i].pct(99),
				fixedP50:      fixed[i].pct(50),
				fixedP99:      fixed[i].pct(99),
			})
		}
		if o.compare == "limiter" {
			// No tenant may come near its budget: then neither limiter
			// made a request wait, and the difference is Redis's cost.
			for i := range configs {
				if perTenant := results[i][round].rps / float64(o.tenants); perTenant > 25/5.2*0.8 {
					return fmt.Errorf("%s: %.1f requests/s per tenant at full speed, near the budget (25 per 5.2 s): raise -tenants", configs[i].name, perTenant)
				}
			}
		}
		a, b := results[0][round], results[1][round]
		fmt.Printf("round %d  full speed: a %6.0f req/s p50 %6.0fµs p99 %6.0fµs | b %6.0f req/s p50 %6.0fµs p99 %6.0fµs | b/a %.3f\n",
			round+1, a.rps, a.p50, a.p99, b.rps, b.p50, b.p99, b.rps/a.rps)
		fmt.Printf("         CPU per request: a %.1fµs | b %.1fµs | b adds %+.1fµs\n",
			a.cpuPerRequest, b.cpuPerRequest, b.cpuPerRequest-a.cpuPerRequest)
		fmt.Printf("         at %d req/s: a p50 %6.0fµs p99 %6.0fµs | b p50 %6.0fµs p99 %6.0fµs | b adds p50 %+5.0fµs p99 %+6.0fµs\n",
			o.rate, a.fixedP50, a.fixedP99, b.fixedP50, b.fixedP99, b.fixedP50-a.fixedP50, b.fixedP99-a.fixedP99)
		if rs != nil {
			cc := commandCounts[round]
			fmt.Printf("         Redis per cached request through b (%d requests): %.3f commands sent (%s); INFO commandstats %.3f (%s); redis-server CPU %.1fµs\n",
				cc.requests, float64(total(cc.sent))/float64(cc.requests), perRequest(cc.sent, cc.requests),
				float64(total(cc.stats))/float64(cc.requests), perRequest(cc.stats, cc.requests), redisCPU[len(redisCPU)-1])
		}
	}

	field := func(rs []roundResult, f func(roundResult) float64) []float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		return v
	}
	pair := func(f func(a, b roundResult) float64) []float64 {
		v := make([]float64, len(results[0]))
		for i := range v {
			v[i] = f(results[0][i], results[1][i])
		}
		return v
	}
	cols := []func(roundResult) float64{
		func(r roundResult) float64 { return r.rps }, func(r roundResult) float64 { return r.p50 },
		func(r roundResult) float64 { return r.p99 }, func(r roundResult) float64 { return r.fixedP50 },
		func(r roundResult) float64 { return r.fixedP99 },
	}
	fmt.Printf("\nmedians over %d rounds (%d tenants; full speed: %d connections, %v each; fixed rate: %d req/s in all, a and b in turn, %v)\n",
		o.rounds, o.tenants, o.concurrency, o.duration, o.rate, o.duration)
	fmt.Printf("%-22s %9s %9s %9s %14s %14s\n", "", "req/s", "p50 µs", "p99 µs", "p50@rate µs", "p99@rate µs")
	for i, cfg := range configs {
		fmt.Printf("%-22s", cfg.name)
		for k, f := range cols {
			w := 9
			if k >= 3 {
				w = 14
			}
			fmt.Printf(" %*.*f", w, map[bool]int{true: 0, false: 1}[k == 0], median(field(results[i], f)))
		}
		fmt.Println()
	}
	ratios := pair(func(a, b roundResult) float64 { return b.rps / a.rps })
	addedP50 := pair(func(a, b roundResult) float64 { return b.fixedP50 - a.fixedP50 })
	addedP99 := pair(func(a, b roundResult) float64 { return b.fixedP99 - a.fixedP99 })
	fmt.Printf("throughput ratio b/a: median %.3f (rounds: %s)\n", median(ratios), list(ratios, "%.3f"))
	fmt.Printf("latency b adds at %d req/s: p50 median %+.0fµs (rounds: %s); p99 median %+.0fµs (rounds: %s)\n",
		o.rate, median(addedP50), list(addedP50, "%+.0f"), median(addedP99), list(addedP99, "%+.0f"))
	fmt.Printf("at %d req/s, all %d rounds pooled (%d samples each): a p50 %.0fµs p99 %.0fµs | b p50 %.0fµs p99 %.0fµs | b adds p50 %+.0fµs p99 %+.0fµs\n",
		o.rate, o.rounds, min(len(pooled[0].latencies), len(pooled[1].latencies)),
		pooled[0].pct(50), pooled[0].pct(99), pooled[1].pct(50), pooled[1].pct(99),
		pooled[1].pct(50)-pooled[0].pct(50), pooled[1].pct(99)-pooled[0].pct(99))
	cpu := func(r roundResult) float64 { return r.cpuPerRequest }
	if median(field(results[0], cpu)) > 0 {
		addedCPU := pair(func(a, b roundResult) float64 { return b.cpuPerRequest - a.cpuPerRequest })
		fmt.Printf("Caddy's CPU per request: a %.1fµs, b %.1fµs; b adds median %+.1fµs (rounds: %s)\n",
			median(field(results[0], cpu)), median(field(results[1], cpu)), median(addedCPU), list(addedCPU, "%+.1f"))
	}
	if rs != nil {
		sent, stats, requests := map[string]int64{}, map[string]int64{}, 0
		for _, cc := range commandCounts {
			requests += cc.requests
			for k, v := range cc.sent {
				sent[k] += v
			}
			for k, v := range cc.stats {
				stats[k] += v
			}
		}
		fmt.Printf("Redis per cached request through b, all rounds (%d requests): %.3f commands sent by the sidecar (%s); INFO commandstats, with the commands the script runs inside Redis: %.3f (%s)\n",
			requests, float64(total(sent))/float64(requests), perRequest(sent, requests), float64(total(stats))/float64(requests), perRequest(stats, requests))
		if len(redisCPU) > 0 {
			fmt.Printf("redis-server's CPU per request through b: median %.1fµs (rounds: %s)\n", median(redisCPU), list(redisCPU, "%.1f"))
		}
	}
	if o.profileDir != "" {
		fmt.Printf("CPU profiles of round 1: go tool pprof -top -diff_base %s %s %s\n",
			filepath.Join(o.profileDir, "a.pprof"), caddyBin, filepath.Join(o.profileDir, "b.pprof"))
	}
	return nil
}

// median of v (the upper one of the middle two for an even count).
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func list(v []float64, format string) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf(format, x)
	}
	return strings.Join(parts, " ")
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

// mintToken asks the fake Fortnox for a client-credentials token.
func mintToken(tokenURL, clientID, secret, tenant string) (string, error) {
	req, err := http.NewRequest(http.MethodPost, tokenURL, strings.NewReader("grant_type=client_credentials"))
	if err != nil {
		return "", err
	}
	req.SetBasicAuth(clientID, secret)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("TenantId", tenant)
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var answer struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&answer); err != nil || answer.AccessToken == "" {
		return "", fmt.Errorf("minting the static token: status %d, %v", resp.StatusCode, err)
	}
	return answer.AccessToken, nil
}

type caddyServer struct {
	proc     *testproc.Proc
	url      string
	adminURL string // "" when admin is off
}

// startCaddy runs the Caddy binary with one site, its storage under dir.
// withAdmin turns the admin endpoint on (on loopback) for CPU profiles.
func startCaddy(bin, dir, site string, withAdmin bool) (*caddyServer, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	port, err := testproc.PickPort()
	if err != nil {
		return nil, err
	}
	admin, adminURL := "admin off", ""
	if withAdmin {
		adminPort, err := testproc.PickPort()
		if err != nil {
			return nil, err
		}
		admin = fmt.Sprintf("admin 127.0.0.1:%d", adminPort)
		adminURL = fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	}
	cfg := filepath.Join(dir, "Caddyfile")
	caddyfile := fmt.Sprintf("{\n\t%s\n\tpersist_config off\n\tstorage file_system %s\n\tlog {\n\t\tlevel ERROR\n\t}\n}\n\nhttp://127.0.0.1:%d {\n\tbind 127.0.0.1\n\t%s\n}\n",
		admin, filepath.Join(dir, "storage"), port, site)
	if err := os.WriteFile(cfg, []byte(caddyfile), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "run", "--config", cfg, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	cmd.Stderr = io.Discard
	proc, err := testproc.Launch(cmd)
	if err != nil {
		return nil, err
	}
	s := &caddyServer{proc: proc, url: fmt.Sprintf("http://127.0.0.1:%d/3/companyinformation", port), adminURL: adminURL}
	if _, err := testproc.Poll(20*time.Second, func() bool {
		c, err := net.Dial("tcp", testproc.Addr(port))
		if err == nil {
			c.Close()
		}
		return err == nil
	}); err != nil {
		s.stop()
		return nil, errors.New("caddy did not start")
	}
	return s, nil
}

// cpu is the CPU time the Caddy process has used so far (Linux; 0
// elsewhere).
func (s *caddyServer) cpu() time.Duration { return processCPU(s.proc.Pid()) }

// globTasks lists /proc/<pid>/task/*/schedstat.
func globTasks(pid int) ([]string, error) {
	return filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
}

// getOK sends one app request for tenant (auth, when set, as the
// Authorization header) and reads the whole answer: anything but a 200 is
// an error.
func getOK(client *http.Client, url, tenant, auth string) error {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("X-Fortnox-Tenant", tenant)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("status %d", resp.StatusCode)
	}
	return err
}

// failed counts a failed request, keeping the first error (the caller
// holds the result's lock).
func (r *loadResult) failed(err error) {
	r.errors++
	if r.firstErr == nil {
		r.firstErr = err
	}
}

// warmTenants sends one request for each tenant, workers at a time, so
// that every tenant's token is cached however many tenants there are.
func warmTenants(url string, tenants []string, workers int) *loadResult {
	res := &loadResult{}
	var mu sync.Mutex
	jobs := make(chan string)
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 30 * time.Second}
	defer client.CloseIdleConnections()
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for tenant := range jobs {
				if err := getOK(client, url, tenant, ""); err != nil {
					mu.Lock()
					res.failed(err)
					mu.Unlock()
				}
			}
		}()
	}
	for _, tenant := range tenants {
		jobs <- tenant
	}
	close(jobs)
	wg.Wait()
	res.took = time.Since(start)
	return res
}

// cpuProfile writes a CPU profile of the next d to path.
func (s *caddyServer) cpuProfile(path string, d time.Duration) error {
	secs := max(1, int(d/time.Second))
	client := &http.Client{Timeout: d + 30*time.Second}
	resp, err := client.Get(fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", s.adminURL, secs))
	if err != nil {
		return fmt.Errorf("CPU profile: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("CPU profile: status %d", resp.StatusCode)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, io.LimitReader(resp.Body, 64<<20)); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// stop interrupts Caddy, and kills it after 5 s.
func (s *caddyServer) stop() {
	_ = s.proc.Stop(os.Interrupt, 5*time.Second)
}

type loadResult struct {
	latencies []time.Duration
	took      time.Duration
	errors    int64
	firstErr  error
}

func (l *loadResult) rps() float64 { return float64(len(l.latencies)) / l.took.Seconds() }

// add appends another measurement of the same config.
func (l *loadResult) add(m *loadResult) {
	l.latencies = append(l.latencies, m.latencies...)
	l.took += m.took
	l.errors += m.errors
	if l.firstErr == nil {
		l.firstErr = m.firstErr
	}
}

// sliceLength is how long one config runs at full speed before the other
// takes its turn.
const sliceLength = time.Second

// sliceCount is how many full-speed slices make up a measurement of d.
func sliceCount(d time.Duration) int { return max(1, int(d/sliceLength)) }

// pct is the p-th percentile latency in microseconds (nearest rank).
func (l *loadResult) pct(p float64) float64 {
	if len(l.latencies) == 0 {
		return 0
	}
	slices.Sort(l.latencies)
	i := int(float64(len(l.latencies)-1) * p / 100)
	return float64(l.latencies[i].Nanoseconds()) / 1e3
}

// load sends requests for duration, spread over the tenants and, in turn,
// over urls (one result per url): as fast as the workers allow when rate is
// 0, else at a fixed rate in all (open loop: requests are sent on schedule,
// however late earlier ones are, and latency counts from the scheduled
// time). auth, when set, is sent as the Authorization header.
func load(urls []string, tenants []string, workers int, duration time.Duration, rate int, auth string) []*loadResult {
	transport := &http.Transport{MaxIdleConnsPerHost: workers, MaxConnsPerHost: workers}
	client := &http.Client{Transport: transport, Timeout: 10 * time.Second}
	defer transport.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()

	var mu sync.Mutex
	res := make([]*loadResult, len(urls))
	for i := range res {
		res[i] = &loadResult{}
	}
	var seq atomic.Int64
	one := func(scheduled time.Time) {
		n := int(seq.Add(1) - 1)
		target := n % len(urls)
		err := getOK(client, urls[target], tenants[(n/len(urls))%len(tenants)], auth)
		lat := time.Since(scheduled)
		mu.Lock()
		r := res[target]
		if err != nil {
			r.failed(err)
		} else {
			r.latencies = append(r.latencies, lat)
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
	took := time.Since(start)
	for _, r := range res {
		r.took = took
	}
	return res
}
