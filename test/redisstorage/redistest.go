package redisstorage

import (
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// The helpers that run redis-server for tests are in test/testproc. These
// three remain because the root package's tests call them.

// StartRedis starts a private redis-server for the test on a free
// 127.0.0.1 port, waits until it answers, and returns its address
// (host:port). The server keeps nothing on disk and is killed when the
// test ends. If redis-server is not on PATH the test is skipped, or fails
// in CI (see InCI). A package whose tests call it should call
// CheckRedisServer from its TestMain, so that the skip is seen.
func StartRedis(t testing.TB) (addr string) {
	t.Helper()
	return testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
}

// InCI reports whether the tests run in CI, where nothing may be skipped
// (testproc.InCI).
func InCI() bool { return testproc.InCI() }

// CheckRedisServer is for a TestMain whose package has tests that need
// redis-server (StartRedis): testproc.CheckBinaries(group, "redis-server").
func CheckRedisServer(group string) bool { return testproc.CheckBinaries(group, "redis-server") }
