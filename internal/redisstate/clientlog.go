package redisstate

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// go-redis logs some failures itself (a dial that failed after its
// retries, a connection a hook rejected), with the standard library's
// logger: unstructured lines on stderr, between Caddy's JSON logs, one per
// failed dial for as long as Redis is down. They go to the plugin's
// logger instead, at debug level: the outage itself is logged once, as a
// WARN, with what the sidecar does meanwhile (Conn.failed).
//
// go-redis has one logger for the process, so the latest Conn's logger
// takes them all.
type clientLog struct{ logger atomic.Pointer[zap.Logger] }

func (l *clientLog) Printf(_ context.Context, format string, v ...any) {
	if logger := l.logger.Load(); logger != nil {
		logger.Debug(strings.TrimPrefix(fmt.Sprintf(format, v...), "redis: "))
	}
}

var (
	goRedisLog     clientLog
	goRedisLogOnce sync.Once
)

// logClientTo routes go-redis's own log lines to logger (see clientLog).
func logClientTo(logger *zap.Logger) {
	goRedisLogOnce.Do(func() { redis.SetLogger(&goRedisLog) })
	goRedisLog.logger.Store(logger.Named("go-redis"))
}
