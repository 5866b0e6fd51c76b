package tokens

import (
	"sync"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Logs a stranger cannot flood. A refusal anyone can cause (a made-up
// tenant or account name, a bad webhook signature) is logged at most once
// a minute per cause; the next line of the cause says how many were left
// out (`suppressed`), and so does the sweeper when none follows. A cause is
// the kind of refusal, plus the tenant when the tenant is one the sidecar
// knows: never a value the client made up, so that the limiter's memory
// cannot grow with them (and it is bounded besides). Metrics count every
// refusal (caddy_fortnox_refusals_total).

const (
	// logCauseEvery is how often one cause may be logged.
	logCauseEvery = time.Minute
	// maxLogCauses bounds how many causes are remembered; past it, new
	// ones share one (overflowLogCause).
	MaxLogCauses     = 1024
	overflowLogCause = "\x00overflow"
)

// LogLimiter lets one line per cause through per logCauseEvery, on the
// plugin's clock.
type LogLimiter struct {
	clock  *clock.Clock
	Mu     sync.Mutex
	Causes map[string]*limitedCause
}

// limitedCause is a cause's last line written and how many were left out
// since.
type limitedCause struct {
	last       time.Time
	suppressed int
	// level, msg and fields are those of the last line written, for the
	// summary the sweeper writes (see flush).
	level  zapcore.Level
	msg    string
	fields []zap.Field
}

func NewLogLimiter(clk *clock.Clock) *LogLimiter {
	return &LogLimiter{clock: clk, Causes: make(map[string]*limitedCause)}
}

// Write logs msg at level unless a line of the same cause was written
// less than a minute ago (then it only counts it). A line written after
// some were left out carries their number as `suppressed`.
func (l *LogLimiter) Write(log *zap.Logger, level zapcore.Level, cause, msg string, fields ...zap.Field) {
	ok, suppressed := l.allow(cause, level, msg, fields)
	if !ok {
		return
	}
	if suppressed > 0 {
		fields = append(fields[:len(fields):len(fields)], zap.Int("suppressed", suppressed))
	}
	if ce := log.Check(level, msg); ce != nil {
		ce.Write(fields...)
	}
}

// allow says whether a line of cause may be written now, and how many of
// the cause were left out before it.
func (l *LogLimiter) allow(cause string, level zapcore.Level, msg string, fields []zap.Field) (bool, int) {
	n := l.clock.Now()
	l.Mu.Lock()
	defer l.Mu.Unlock()
	c := l.Causes[cause]
	if c == nil && len(l.Causes) >= MaxLogCauses {
		l.forgetQuiet(n)
		if len(l.Causes) >= MaxLogCauses {
			cause = overflowLogCause
			c = l.Causes[cause]
		}
	}
	if c == nil {
		l.Causes[cause] = &limitedCause{last: n, level: level, msg: msg, fields: fields}
		return true, 0
	}
	if n.Sub(c.last) < logCauseEvery {
		c.suppressed++
		return false, 0
	}
	suppressed := c.suppressed
	c.last, c.suppressed, c.level, c.msg, c.fields = n, 0, level, msg, fields
	return true, suppressed
}

// forgetQuiet drops the causes with nothing left out whose minute has
// passed. The caller holds l.mu.
func (l *LogLimiter) forgetQuiet(n time.Time) {
	for cause, c := range l.Causes {
		if c.suppressed == 0 && n.Sub(c.last) >= logCauseEvery {
			delete(l.Causes, cause)
		}
	}
}

// Flush writes, for each cause whose minute has passed with lines left
// out, one line that says how many (so a burst that stopped is still
// counted in the log), and forgets the quiet causes.
func (l *LogLimiter) Flush(log *zap.Logger) {
	n := l.clock.Now()
	type summary struct {
		level      zapcore.Level
		msg        string
		fields     []zap.Field
		suppressed int
	}
	var out []summary
	l.Mu.Lock()
	for _, c := range l.Causes {
		if c.suppressed > 0 && n.Sub(c.last) >= logCauseEvery {
			out = append(out, summary{c.level, c.msg, c.fields, c.suppressed})
			c.last, c.suppressed = n, 0
		}
	}
	l.forgetQuiet(n)
	l.Mu.Unlock()
	for _, s := range out {
		if ce := log.Check(s.level, s.msg); ce != nil {
			ce.Write(append(s.fields[:len(s.fields):len(s.fields)], zap.Int("suppressed", s.suppressed))...)
		}
	}
}

// CountRefusal counts a refused request by its kind (the error code of
// the answer): every one, whether or not its log line was written.
func CountRefusal(kind string) {
	metrics.Refusals.WithLabelValues(kind).Inc()
}
