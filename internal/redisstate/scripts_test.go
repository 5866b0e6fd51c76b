package redisstate

import (
	"context"
	"os/exec"
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/redis/go-redis/v9"
)

// Every Lua script compiles in a real Redis: a script that does not (a Lua
// keyword as a variable name, once) fails only when it first runs, and
// looks like a Redis outage then. (The Backend's scripts also run in
// internal/tokens's TestBackendConformance, which fails on a call that
// made the connection count Redis as down.)
func TestRedisScriptsCompile(t *testing.T) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatal("redis-server is not on PATH: install it (apt-get install redis-server; CI does)")
	}
	client := redis.NewClient(&redis.Options{Addr: testproc.StartRedis(t, testproc.RedisConfig{}).Addr()})
	defer client.Close()
	for name, s := range map[string]*redis.Script{
		"turn": turnScript, "pause": pauseScript, "drop": dropScript, "newer": newerScript,
		"invalidation": invalidationScript, "slot": slotScript, "claim": claimScript, "take": takeScript,
	} {
		if err := s.Load(context.Background(), client).Err(); err != nil {
			t.Errorf("the %s script: %v", name, err)
		}
	}
}
