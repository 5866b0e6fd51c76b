package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/rueidis"

	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
)

// The client comparison (-compare clients, issue 18 item 5): go-redis v9,
// the client the plugin ships (its options as the plugin sets them:
// redisstate.ParseRedisURL, a pool of 10 connections per CPU), against
// rueidis with auto-pipelining on (its default: concurrent commands share
// one connection, written in batches) and client-side caching off. Both
// run what a cached request costs the plugin in Redis, against one local
// redis-server:
//
//   - turn: the limiter's turn script (EVALSHA, the same keys: log, pause,
//     generation) over -tenants tenants, none near its budget;
//   - token: HGET of a shared token's "data" field (a 3 KB value), what a
//     sidecar reads when its own cache misses.
//
// For each operation and concurrency (goroutines each calling in a loop),
// the two clients run in interleaved slices (which goes first rotates),
// so that both meet the machine's slow moments alike. Printed: calls per
// second and the p50/p99 a call takes, and rueidis ÷ go-redis. rueidis is
// imported here only: no product package uses it.

// clientConcurrency are the goroutines calling at once.
var clientConcurrency = []int{1, 16, 64}

// clientSliceCalls is how many calls one slice of one client makes.
const clientSliceCalls = 2000

// benchClient is one client under test.
type benchClient struct {
	name  string
	turn  func(ctx context.Context, tenant string) error
	token func(ctx context.Context, key string) error
	close func()
}

func goRedisClient(r *redisServer) (*benchClient, error) {
	opts, err := redisstate.ParseRedisURL(r.url())
	if err != nil {
		return nil, err
	}
	c := redis.NewClient(opts)
	turn := redis.NewScript(redisstate.TurnScriptSource)
	return &benchClient{
		name: "go-redis v9",
		turn: func(ctx context.Context, tenant string) error {
			return turn.Run(ctx, c, turnKeys("go-redis", tenant), 5200, 25, 15000).Err()
		},
		token: func(ctx context.Context, key string) error { return c.HGet(ctx, key, "data").Err() },
		close: func() { c.Close() },
	}, nil
}

func rueidisClient(r *redisServer) (*benchClient, error) {
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{r.addr}, DisableCache: true})
	if err != nil {
		return nil, err
	}
	turn := rueidis.NewLuaScript(redisstate.TurnScriptSource)
	return &benchClient{
		name: "rueidis",
		turn: func(ctx context.Context, tenant string) error {
			return turn.Exec(ctx, c, turnKeys("rueidis", tenant), []string{"5200", "25", "15000"}).Error()
		},
		token: func(ctx context.Context, key string) error {
			return c.Do(ctx, c.B().Hget().Key(key).Field("data").Build()).Error()
		},
		close: c.Close,
	}, nil
}

// turnKeys are a tenant's limiter keys, apart for each client so that
// neither's turns count against the other's.
func turnKeys(client, tenant string) []string {
	base := "bench-clients:" + client + ":caddy-fortnox:turns:fortnox/bench/" + tenant
	return []string{base, base + ":pause", base + ":generation"}
}

// clientRun is one client's measurements of one operation and concurrency.
type clientRun struct {
	lat loadResult
}

func compareClients(r *redisServer, calls, tenants int) error {
	clients := []*benchClient{}
	for _, mk := range []func(*redisServer) (*benchClient, error){goRedisClient, rueidisClient} {
		c, err := mk(r)
		if err != nil {
			return err
		}
		defer c.close()
		clients = append(clients, c)
	}
	ctx := context.Background()
	if err := r.flush(); err != nil {
		return err
	}
	// The shared tokens: 100 keys of 3 KB, as the plugin stores them.
	value := strings.Repeat("x", 3000)
	tokenKeys := make([]string, 100)
	for i := range tokenKeys {
		tokenKeys[i] = "bench-clients:caddy-fortnox:token:fortnox/bench/" + strconv.Itoa(i)
		if err := r.client.HSet(ctx, tokenKeys[i], "data", value, "hash", "0123456789abcdef").Err(); err != nil {
			return err
		}
	}
	ops := []struct {
		name string
		call func(c *benchClient, i int) error
	}{
		{"turn script (EVALSHA)", func(c *benchClient, i int) error { return c.turn(ctx, strconv.Itoa(i%tenants)) }},
		{"shared token (HGET, 3 KB)", func(c *benchClient, i int) error { return c.token(ctx, tokenKeys[i%len(tokenKeys)]) }},
	}
	slicesPer := max(1, calls/clientSliceCalls)
	fmt.Printf("\nclient comparison: %s against %s, redis at %s; %d calls per client, operation and concurrency, in slices of %d, the clients in turn\n",
		clients[1].name+" (auto-pipelining, no client-side cache)", clients[0].name+" (as the plugin ships it)", r.addr, slicesPer*clientSliceCalls, clientSliceCalls)
	fmt.Printf("  %-26s %4s  %-28s  %-28s  %s\n", "", "", "go-redis", "rueidis", "rueidis ÷ go-redis")
	fmt.Printf("  %-26s %4s  %10s %8s %8s  %10s %8s %8s  %8s %6s %6s\n", "operation", "conc", "calls/s", "p50 µs", "p99 µs", "calls/s", "p50 µs", "p99 µs", "calls/s", "p50", "p99")
	for _, op := range ops {
		for _, conc := range clientConcurrency {
			runs := make([]clientRun, len(clients))
			for s := range slicesPer {
				for k := range clients {
					ci := (s + k) % len(clients)
					m, err := clientSlice(clients[ci], op.call, conc, s*clientSliceCalls)
					if err != nil {
						return fmt.Errorf("%s, %s: %w", clients[ci].name, op.name, err)
					}
					runs[ci].lat.add(m)
				}
			}
			g, ru := &runs[0].lat, &runs[1].lat
			fmt.Printf("  %-26s %4d  %10.0f %8.0f %8.0f  %10.0f %8.0f %8.0f  %8.2f %6.2f %6.2f\n", op.name, conc,
				g.rps(), g.pct(50), g.pct(99), ru.rps(), ru.pct(50), ru.pct(99), ru.rps()/g.rps(), ru.pct(50)/g.pct(50), ru.pct(99)/g.pct(99))
		}
	}
	return nil
}

// clientSlice makes clientSliceCalls calls of op through c from conc
// goroutines, numbered from first.
func clientSlice(c *benchClient, op func(c *benchClient, i int) error, conc, first int) (*loadResult, error) {
	res := &loadResult{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	per := clientSliceCalls / conc
	start := time.Now()
	for g := range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lats := make([]time.Duration, 0, per)
			var firstErr error
			for i := range per {
				t0 := time.Now()
				err := op(c, first+g*per+i)
				lats = append(lats, time.Since(t0))
				if err != nil && !errors.Is(err, redis.Nil) && !rueidis.IsRedisNil(err) && firstErr == nil {
					firstErr = err
				}
			}
			mu.Lock()
			defer mu.Unlock()
			res.latencies = append(res.latencies, lats...)
			if firstErr != nil && res.firstErr == nil {
				res.firstErr = firstErr
			}
		}()
	}
	wg.Wait()
	res.took = time.Since(start)
	return res, res.firstErr
}

// runClients is -compare clients: the client comparison alone, against a
// redis-server of its own.
func runClients(o options) error {
	return withOwnRedis(o, "client comparison", func(rs *redisServer) error {
		return compareClients(rs, o.scripts, o.tenants)
	})
}

// withOwnRedis runs a comparison against a redis-server of its own, in a
// directory removed afterwards, after a line naming it.
func withOwnRedis(o options, what string, compare func(*redisServer) error) error {
	dir, err := os.MkdirTemp("", "fortnox-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	rs, err := startRedis(dir, o.appendfsync)
	if err != nil {
		return err
	}
	defer rs.stop()
	fmt.Printf("%s: redis at %s, appendfsync %s\n", what, rs.addr, o.appendfsync)
	return compare(rs)
}
