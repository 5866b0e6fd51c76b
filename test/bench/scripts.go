package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
)

// The script comparison (-compare limiter, -scripts calls): the limiter's
// Lua script as it ships, the script before issue 6 of "The shared store
// may fail" (8 commands inside Redis per request), and a bare EVALSHA of a
// one-command script, called straight from the bench over one connection,
// in slices of scriptSlice calls, all in turn (rotating which goes
// first), so that all three meet the machine's slow moments alike. Per
// variant: Redis's CPU per call, both redis-server's own (schedstat, which
// includes reading and writing the socket) and INFO commandstats's
// evalsha usec (the script's run inside Redis), and the p50 and p99 of the
// round trip the client sees.

// oldTurnScript is the limiter's turn script before the rewrite, kept
// to compare.
var oldTurnScript = redis.NewScript(redisstate.FirstTurnScriptSource)

// bareScript is one command: what any EVALSHA costs at the least.
var bareScript = redis.NewScript(`return redis.call('GET', KEYS[1])`)

const scriptSlice = 500

type scriptVariant struct {
	name   string
	script *redis.Script
	keys   func(tenant string) []string
	// measured
	calls, usec int64
	cpu         time.Duration
	lat         loadResult
}

// scriptScenario is one way of calling the scripts: over many tenants
// whose logs never fill (as in the Caddy rounds), or over a few whose
// logs are always full (a tenant at its budget).
type scriptScenario struct {
	name    string
	tenants int
	maxWait int64 // ms
}

func compareScripts(r *redisServer, calls, tenants int) error {
	scenarios := []scriptScenario{
		{fmt.Sprintf("%d tenants, none near its budget", tenants), tenants, 15000},
		{"20 tenants, each with its log full (every call reserves a turn)", 20, 1 << 40},
	}
	fmt.Printf("\nscript comparison: EVALSHA straight to redis-server (appendfsync as above), one connection, %d calls per variant and scenario, in slices of %d, the variants in turn; rate_limit 25 5s (window 5200 ms with the margin)\n", calls, scriptSlice)
	for si, sc := range scenarios {
		if err := r.flush(); err != nil {
			return err
		}
		prefix := fmt.Sprintf("bench-scripts:%d:", si)
		base := func(variant, tenant string) string {
			return prefix + variant + ":caddy-fortnox:turns:fortnox/bench/" + tenant
		}
		variants := []*scriptVariant{
			{name: "bare (GET)", script: bareScript, keys: func(t string) []string { return []string{base("bare", t) + ":pause"} }},
			{name: "old (8 commands)", script: oldTurnScript, keys: func(t string) []string { return []string{base("old", t), base("old", t) + ":pause"} }},
			{name: "new", script: redis.NewScript(redisstate.TurnScriptSource), keys: func(t string) []string {
				return []string{base("new", t), base("new", t) + ":pause", base("new", t) + ":generation"}
			}},
			// The same script once every tenant has had events: its
			// generation key exists (issue 18 item 3), read by the MGET.
			{name: "new, generation", script: redis.NewScript(redisstate.TurnScriptSource), keys: func(t string) []string {
				return []string{base("gen", t), base("gen", t) + ":pause", base("gen", t) + ":generation"}
			}},
		}
		ctx := context.Background()
		if _, err := r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i := range sc.tenants {
				p.Set(ctx, base("gen", strconv.Itoa(i))+":generation", 7, 0)
			}
			return nil
		}); err != nil {
			return err
		}
		for _, v := range variants {
			if err := v.script.Load(ctx, r.client).Err(); err != nil {
				return fmt.Errorf("loading the %s script: %w", v.name, err)
			}
		}
		slices := max(1, calls/scriptSlice)
		for s := range slices {
			for k := range variants {
				v := variants[(s+k)%len(variants)]
				if err := v.slice(ctx, r, sc, s); err != nil {
					return err
				}
			}
		}
		bare := variants[0]
		fmt.Printf("%s:\n", sc.name)
		fmt.Printf("  %-18s %12s %8s %13s %8s %8s %8s %8s\n", "", "Redis CPU µs", "÷ bare", "evalsha usec", "÷ bare", "p50 µs", "p99 µs", "÷ bare")
		for _, v := range variants {
			fmt.Printf("  %-18s %12.2f %8.2f %13.2f %8.2f %8.0f %8.0f %8.2f\n", v.name,
				v.cpuPerCall(), v.cpuPerCall()/bare.cpuPerCall(), v.usecPerCall(), v.usecPerCall()/bare.usecPerCall(),
				v.lat.pct(50), v.lat.pct(99), v.lat.pct(50)/bare.lat.pct(50))
		}
		if err := printScriptCommands(r, prefix, variants, sc); err != nil {
			return err
		}
	}
	return nil
}

func (v *scriptVariant) cpuPerCall() float64 {
	return float64(v.cpu.Nanoseconds()) / 1e3 / float64(max(1, v.calls))
}

func (v *scriptVariant) usecPerCall() float64 { return float64(v.usec) / float64(max(1, v.calls)) }

// slice makes scriptSlice calls of v, one at a time, and adds what Redis
// spent on them.
func (v *scriptVariant) slice(ctx context.Context, r *redisServer, sc scriptScenario, s int) error {
	calls0, usec0, err := r.evalshaStats()
	if err != nil {
		return err
	}
	cpu0 := r.cpu()
	for i := range scriptSlice {
		tenant := strconv.Itoa((s*scriptSlice + i) % sc.tenants)
		start := time.Now()
		err := v.script.EvalSha(ctx, r.client, v.keys(tenant), 5200, 25, sc.maxWait).Err()
		lat := time.Since(start)
		if err != nil && err != redis.Nil {
			return fmt.Errorf("the %s script: %w", v.name, err)
		}
		v.lat.latencies = append(v.lat.latencies, lat)
	}
	cpu1 := r.cpu()
	calls1, usec1, err := r.evalshaStats()
	if err != nil {
		return err
	}
	v.calls += calls1 - calls0
	v.usec += usec1 - usec0
	v.cpu += cpu1 - cpu0
	return nil
}

// printScriptCommands counts, with INFO commandstats, the commands one
// more slice of each variant runs inside Redis.
func printScriptCommands(r *redisServer, prefix string, variants []*scriptVariant, sc scriptScenario) error {
	parts := []string{}
	for _, v := range variants {
		before, err := r.commandStats()
		if err != nil {
			return err
		}
		var scratch scriptVariant = *v
		scratch.lat = loadResult{}
		if err := scratch.slice(context.Background(), r, sc, 0); err != nil {
			return err
		}
		after, err := r.commandStats()
		if err != nil {
			return err
		}
		stats := map[string]int64{}
		for name, calls := range after {
			if d := calls - before[name]; d > 0 && name != "info" {
				stats[name] = d
			}
		}
		parts = append(parts, fmt.Sprintf("%s %.3f (%s)", v.name, float64(total(stats))/scriptSlice, perRequest(stats, scriptSlice)))
	}
	fmt.Printf("  commands per call, INFO commandstats: %s\n", strings.Join(parts, "; "))
	return nil
}

// evalshaStats reads INFO commandstats's evalsha calls and usec.
func (r *redisServer) evalshaStats() (calls, usec int64, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := r.client.Info(ctx, "commandstats").Result()
	if err != nil {
		return 0, 0, err
	}
	return parseCommandStat(info, "evalsha")
}

// parseCommandStat reads one command's calls and usec from INFO
// commandstats (0, 0 when it has not run).
func parseCommandStat(info, name string) (calls, usec int64, err error) {
	for _, line := range strings.Split(info, "\r\n") {
		rest, ok := strings.CutPrefix(line, "cmdstat_"+name+":")
		if !ok {
			continue
		}
		for _, field := range strings.Split(rest, ",") {
			k, val, _ := strings.Cut(field, "=")
			var dst *int64
			switch k {
			case "calls":
				dst = &calls
			case "usec":
				dst = &usec
			default:
				continue
			}
			if *dst, err = strconv.ParseInt(val, 10, 64); err != nil {
				return 0, 0, fmt.Errorf("INFO commandstats line %q", line)
			}
		}
	}
	return calls, usec, nil
}

// runScriptsOnly is -compare limiter -rounds 0: the script comparison
// alone, against a redis-server of its own.
func runScriptsOnly(o options) error {
	return withOwnRedis(o, "script comparison only (-rounds 0)", func(rs *redisServer) error {
		return compareScripts(rs, o.scripts, o.tenants)
	})
}
