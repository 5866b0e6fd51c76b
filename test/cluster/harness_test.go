// Package cluster proves cluster mode (`redis <url>`) with three real Caddy
// processes, each with its own pod-local storage directory, all joined to
// one real redis-server that persists to an append-only file with fsync on
// every write, against the fake Fortnox in this test process. The tests
// count at the fake Fortnox (token requests, 429s, invalid_grant), set
// max_wait explicitly, and kill sidecars and Redis with SIGKILL.
//
// go test -short skips them with a visible line; in CI (CI=true) nothing
// may skip. FORTNOX_KEEP_LOGS=1 keeps the sidecars' logs (the path is
// printed at the end).
package cluster

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-fortnox/caddy-fortnox/test/caddybin"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/logscan"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

const (
	clientID      = "cluster-client"
	clientSecret  = "cluster-secret-5b2c9e71"
	webhookSecret = "cluster-webhook-secret-0d4a"
	notifySecret  = "cluster-notify-secret-6e1f"
	// encryptionKey is encryption_key in every sidecar: 32 bytes, base64.
	encryptionKey = "Zm9ydG5veC1jbHVzdGVyLXRlc3Qta2V5LTMyYnl0ZXM="

	// The fake's rate limit, as Fortnox's, and the sidecars' rate_limit.
	budget       = 25
	budgetWindow = 5 * time.Second
)

var (
	logDir string
	// sidecars counts the sidecars started, so that each writes its own
	// log file: Caddy appends to an existing one, and a test run again
	// (go test -count=N) would count the earlier runs' lines too.
	sidecars atomic.Int64
)

func TestMain(m *testing.M) {
	flag.Parse() // for testing.Short
	if testing.Short() {
		if !testproc.AnnounceSkip("test/cluster: three sidecars in cluster mode on Redis", "go test -short") {
			os.Exit(1)
		}
	} else if !testproc.CheckBinaries("test/cluster: three sidecars in cluster mode on Redis", "redis-server") {
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "fortnox-cluster-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	logDir = dir
	code := m.Run()
	if code == 0 && !testing.Short() {
		if err := scanLogs(); err != nil {
			fmt.Fprintln(os.Stderr, "FAIL: log scan:", err)
			code = 1
		}
	}
	if os.Getenv("FORTNOX_KEEP_LOGS") != "" {
		fmt.Println("sidecar logs kept in", dir)
	} else {
		os.RemoveAll(dir)
	}
	os.Exit(code)
}

// scanLogs fails when any sidecar's log holds a token, a refresh token,
// the client secret, the webhook secret or the encryption key.
func scanLogs() error {
	files, _ := filepath.Glob(filepath.Join(logDir, "*.log"))
	if len(files) == 0 {
		return fmt.Errorf("no sidecar log in %s: nothing was scanned", logDir)
	}
	lines, err := logscan.Files(files, clientSecret, webhookSecret, encryptionKey, notifySecret)
	if err == nil {
		fmt.Printf("log scan: %d lines in %d files, no token or secret\n", lines, len(files))
	}
	return err
}

// buildCaddy builds the test binary once (see caddybin).
func buildCaddy(t *testing.T) string {
	t.Helper()
	return caddybin.Build(t, logDir)
}

// startFake starts the fake Fortnox with Fortnox's rate limit (25 per 5 s)
// and the given token lifetime (0: an hour).
func startFake(t *testing.T, lifetime time.Duration) *fakefortnox.Server {
	t.Helper()
	return testproc.StartFake(t, fakefortnox.Options{
		Clients:       map[string]string{clientID: clientSecret},
		TokenLifetime: lifetime,
		RateLimit:     budget,
		RateWindow:    budgetWindow,
	})
}

// settings are what differ between the tests' sidecars.
type settings struct {
	redisURL      string        // "" = no `redis` line (one process, pod-local storage)
	redisCluster  string        // a Redis Cluster's nodes, comma-separated: `redis { cluster … }` instead
	maxWait       time.Duration // max_wait, always set explicitly
	refreshBefore time.Duration // refresh_before (0: 5m, the default)
	notifyURL     string        // notify's url ("" = no notify block)
	// sentinel is `<master> <host:port>...` for a `redis { sentinel … }`
	// block instead of redisURL.
	sentinel string
	// rotationTimeout is rotation_timeout (0: 10m, the default).
	rotationTimeout time.Duration
}

// sidecar is one Caddy process with the fortnox handler on its own port,
// a fortnox_webhook site on another, and its own storage directory. It can
// be killed (SIGKILL) and started again on the same ports and storage.
type sidecar struct {
	t        *testing.T
	name     string
	fake     *fakefortnox.Server
	storage  string
	url      string
	adminURL string
	hookURL  string
	ports    [3]int
	logPath  string
	config   string
	redisURL string
	// redisCluster is FORTNOX_REDIS_CLUSTER, the nodes of `redis { cluster
	// {env.FORTNOX_REDIS_CLUSTER} }` (one placeholder for three addresses).
	redisCluster string

	mu   sync.Mutex
	proc *testproc.Proc // nil before the first start
	// generation counts starts: a request that began under an earlier one
	// met a kill.
	generation atomic.Int64
	up         atomic.Bool
}

func newSidecar(t *testing.T, name string, fake *fakefortnox.Server, s settings) *sidecar {
	t.Helper()
	buildCaddy(t)
	sc := &sidecar{t: t, name: name, fake: fake, storage: t.TempDir()}
	sc.ports = [3]int{testproc.FreePort(t), testproc.FreePort(t), testproc.FreePort(t)}
	sc.url = fmt.Sprintf("http://127.0.0.1:%d", sc.ports[0])
	sc.adminURL = fmt.Sprintf("http://127.0.0.1:%d", sc.ports[1])
	sc.hookURL = fmt.Sprintf("http://127.0.0.1:%d/fortnox/webhook", sc.ports[2])
	sc.logPath = filepath.Join(logDir, fmt.Sprintf("%s-%s-%d.log", strings.ReplaceAll(t.Name(), "/", "_"), name, sidecars.Add(1)))
	sc.config = filepath.Join(t.TempDir(), "Caddyfile")
	sc.configure(s)
	t.Cleanup(sc.stop)
	sc.start()
	return sc
}

// configure writes the sidecar's Caddyfile; the next start uses it.
func (sc *sidecar) configure(s settings) {
	sc.t.Helper()
	var opts strings.Builder
	fmt.Fprintf(&opts, "\t\tmax_wait %s\n", s.maxWait)
	if s.refreshBefore > 0 {
		fmt.Fprintf(&opts, "\t\trefresh_before %s\n", s.refreshBefore)
	}
	if s.rotationTimeout > 0 {
		fmt.Fprintf(&opts, "\t\trotation_timeout %s\n", s.rotationTimeout)
	}
	switch {
	case s.redisCluster != "":
		opts.WriteString("\t\tredis {\n\t\t\tcluster {env.FORTNOX_REDIS_CLUSTER}\n\t\t}\n")
	case s.redisURL != "":
		opts.WriteString("\t\tredis {env.FORTNOX_REDIS_URL}\n")
	}
	if s.sentinel != "" {
		fmt.Fprintf(&opts, "\t\tredis {\n\t\t\tsentinel %s\n\t\t}\n", s.sentinel)
	}
	if s.notifyURL != "" {
		fmt.Fprintf(&opts, "\t\tnotify {\n\t\t\turl %s\n\t\t\tsecret {env.FORTNOX_NOTIFY_SECRET}\n\t\t}\n", s.notifyURL)
	}
	caddyfile := fmt.Sprintf(`{
	admin 127.0.0.1:%[2]d
	persist_config off
	storage file_system %[4]s
	log {
		output file %[5]s
		format json
		level DEBUG
	}
}

http://127.0.0.1:%[1]d {
	bind 127.0.0.1
	fortnox {
		client_id {env.FORTNOX_CLIENT_ID}
		client_secret {env.FORTNOX_CLIENT_SECRET}
		token_url %[6]s
		rate_limit %[8]d %[9]s
		encryption_key {env.FORTNOX_STORAGE_KEY}
		check_credentials off
%[10]s	}
	reverse_proxy %[7]s
}

http://127.0.0.1:%[3]d {
	bind 127.0.0.1
	fortnox_webhook {
		client_id {env.FORTNOX_CLIENT_ID}
		token_url %[6]s
		secret {env.FORTNOX_WEBHOOK_SECRET}
	}
}
`, sc.ports[0], sc.ports[1], sc.ports[2], sc.storage, sc.logPath, sc.fake.TokenURL(), sc.fake.URL(),
		budget, budgetWindow, opts.String())
	if err := os.WriteFile(sc.config, []byte(caddyfile), 0o600); err != nil {
		sc.t.Fatal(err)
	}
	sc.redisURL, sc.redisCluster = s.redisURL, s.redisCluster
}

// start runs the process and waits until it serves.
func (sc *sidecar) start() {
	sc.t.Helper()
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.proc != nil && !sc.proc.Exited() {
		sc.t.Fatalf("%s: start while running", sc.name)
	}
	stderrPath := strings.TrimSuffix(sc.logPath, ".log") + ".stderr.log"
	stderr, err := os.OpenFile(stderrPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		sc.t.Fatal(err)
	}
	defer stderr.Close() // the process has its own copy
	cmd := exec.Command(buildCaddy(sc.t), "run", "--config", sc.config, "--adapter", "caddyfile")
	home := filepath.Join(sc.storage, "home")
	cmd.Env = append(os.Environ(),
		"FORTNOX_CLIENT_ID="+clientID, "FORTNOX_CLIENT_SECRET="+clientSecret,
		"FORTNOX_STORAGE_KEY="+encryptionKey, "FORTNOX_WEBHOOK_SECRET="+webhookSecret,
		"FORTNOX_REDIS_URL="+sc.redisURL, "FORTNOX_REDIS_CLUSTER="+sc.redisCluster, "FORTNOX_NOTIFY_SECRET="+notifySecret,
		"XDG_DATA_HOME="+home, "XDG_CONFIG_HOME="+home, "HOME="+home)
	cmd.Stdout, cmd.Stderr = stderr, stderr
	proc, err := testproc.Launch(cmd)
	if err != nil {
		sc.t.Fatal(err)
	}
	sc.proc = proc
	sc.generation.Add(1)
	switch err := proc.WaitHTTP(sc.adminURL+"/config/", 30*time.Second); {
	case errors.Is(err, testproc.ErrExited):
		sc.t.Fatalf("%s exited while starting (see %s)", sc.name, stderrPath)
	case err != nil:
		sc.t.Fatalf("%s did not start within 30s", sc.name)
	}
	sc.up.Store(true)
}

// kill ends the process with SIGKILL: no cleanup, Redis locks left behind.
func (sc *sidecar) kill() {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.up.Store(false)
	sc.proc.Kill()
}

// stop ends the process gracefully (SIGTERM), as a rolling restart does.
func (sc *sidecar) stop() {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.proc == nil || sc.proc.Exited() {
		return
	}
	sc.up.Store(false)
	if err := sc.proc.Stop(syscall.SIGTERM, stopWithin); err != nil {
		// A rolling restart would hang: Kubernetes kills it after its
		// grace period, maybe in the middle of a refresh. (Stop killed
		// it.)
		sc.t.Errorf("%s did not stop within %v of SIGTERM", sc.name, stopWithin)
	}
}

// stopWithin is how long a sidecar may take to stop after SIGTERM.
const stopWithin = 10 * time.Second

// client is the apps' HTTP client: the sidecars' max_wait is well inside
// its timeout.
var client = &http.Client{Timeout: 90 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}

// answer is one request's outcome as the app sees it.
type answer struct {
	status     int
	retryAfter string
	body       string
	err        error // transport error (status 0)
	took       time.Duration
	generation int64 // the sidecar's start the request began under
}

func (a answer) String() string {
	if a.err != nil {
		return a.err.Error()
	}
	return fmt.Sprintf("%d %s", a.status, strings.TrimSpace(a.body))
}

// get sends GET /3/companyinformation for tenant, as an app does.
func (sc *sidecar) get(tenant string) answer { return sc.getAs(tenant, "") }

// getAs is get as a named user account of the tenant ("" = the service
// account).
func (sc *sidecar) getAs(tenant, account string) answer {
	gen := sc.generation.Load()
	req, _ := http.NewRequest(http.MethodGet, sc.url+"/3/companyinformation", nil)
	req.Header.Set("X-Fortnox-Tenant", tenant)
	if account != "" {
		req.Header.Set("X-Fortnox-Account", account)
	}
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return answer{err: err, took: time.Since(start), generation: gen}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return answer{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After"), body: string(b), took: time.Since(start), generation: gen}
}

// mustServe fails unless tenant is served through the sidecar.
func (sc *sidecar) mustServe(tenant string) {
	sc.t.Helper()
	if a := sc.get(tenant); a.status != http.StatusOK {
		sc.t.Fatalf("%s, tenant %s: %v", sc.name, tenant, a)
	}
}

// putRefreshToken hands a refresh token over through the admin API.
func (sc *sidecar) putRefreshToken(tenant, rt string) {
	sc.t.Helper()
	sc.putAdmin("/fortnox/tenants/"+tenant+"/refresh_token", rt)
}

// putAccountRefreshToken hands over a named user account's refresh token.
func (sc *sidecar) putAccountRefreshToken(tenant, account, rt string) {
	sc.t.Helper()
	sc.putAdmin("/fortnox/tenants/"+tenant+"/accounts/"+account+"/refresh_token", rt)
}

func (sc *sidecar) putAdmin(path, rt string) {
	sc.t.Helper()
	req, _ := http.NewRequest(http.MethodPut, sc.adminURL+path, strings.NewReader(`{"refresh_token":"`+rt+`"}`))
	resp, err := client.Do(req)
	if err != nil {
		sc.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		b, _ := io.ReadAll(resp.Body)
		sc.t.Fatalf("%s: PUT refresh token: %d %s", sc.name, resp.StatusCode, b)
	}
}

// postConsentEvent sends a signed consent event ("client_credentials_consent"
// or "client_credentials_consent_revoked") to the sidecar's webhook.
func (sc *sidecar) postConsentEvent(event, tenant string) {
	sc.t.Helper()
	body := fmt.Sprintf(`{"event":%q,"tenant_id":%s}`, event, tenant)
	mac := hmac.New(sha256.New, []byte(webhookSecret))
	mac.Write([]byte(body))
	req, _ := http.NewRequest(http.MethodPost, sc.hookURL, strings.NewReader(body))
	req.Header.Set("X-Signature", base64.StdEncoding.EncodeToString(mac.Sum(nil)))
	resp, err := client.Do(req)
	if err != nil {
		sc.t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		sc.t.Fatalf("%s: webhook %s: %d", sc.name, event, resp.StatusCode)
	}
}

// metric reads a counter or gauge (without labels) from the sidecar's
// Prometheus metrics on the admin endpoint.
func (sc *sidecar) metric(name string) float64 {
	sc.t.Helper()
	resp, err := client.Get(sc.adminURL + "/metrics")
	if err != nil {
		sc.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				sc.t.Fatalf("%s: metric line %q", sc.name, line)
			}
			return v
		}
	}
	sc.t.Fatalf("%s: no metric %s in /metrics", sc.name, name)
	return 0
}

// logLines returns the messages of the sidecar's log lines that contain
// substr in their "msg".
func (sc *sidecar) logLines(substr string) []string {
	sc.t.Helper()
	raw, err := os.ReadFile(sc.logPath)
	if err != nil {
		sc.t.Fatal(err)
	}
	var out []string
	for _, line := range bytes.Split(raw, []byte("\n")) {
		var entry struct {
			Msg string `json:"msg"`
		}
		if json.Unmarshal(line, &entry) == nil && strings.Contains(entry.Msg, substr) {
			out = append(out, entry.Msg)
		}
	}
	return out
}

// waitLog waits until the sidecar's log has at least n lines whose message
// contains substr.
func (sc *sidecar) waitLog(substr string, n int, within time.Duration) {
	sc.t.Helper()
	deadline := time.Now().Add(within)
	for len(sc.logLines(substr)) < n {
		if time.Now().After(deadline) {
			sc.t.Fatalf("%s: no log line %q within %v", sc.name, substr, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// cluster is three sidecars on one Redis (or on a Redis Cluster: nodes).
type cluster struct {
	t        *testing.T
	fake     *fakefortnox.Server
	redis    *testproc.Redis
	nodes    *testproc.Cluster
	sidecars []*sidecar
}

// redisAOF is the cluster's Redis: it persists to an append-only file with
// fsync on every write, as the plugin's docs recommend, so that a test can
// kill it (SIGKILL) and start it again with what it acknowledged.
var redisAOF = testproc.RedisConfig{AppendOnly: true, AppendFsync: "always"}

// startCluster starts Redis (AOF, fsync always) and three sidecars on it.
func startCluster(t *testing.T, fake *fakefortnox.Server, s settings) *cluster {
	t.Helper()
	buildCaddy(t)
	rs := testproc.StartRedis(t, redisAOF)
	s.redisURL = rs.URL()
	c := &cluster{t: t, fake: fake, redis: rs}
	for _, name := range []string{"a", "b", "c"} {
		c.sidecars = append(c.sidecars, newSidecar(t, name, fake, s))
	}
	c.waitSubscribed()
	return c
}

// eventsChannel is where the sidecars of clientID broadcast events.
const eventsChannel = "caddy-fortnox:events:fortnox/" + clientID + "/"

// waitSubscribed waits until every running sidecar listens to the
// cluster's events (each subscribes shortly after it starts).
func (c *cluster) waitSubscribed() {
	c.t.Helper()
	running := 0
	for _, sc := range c.sidecars {
		if sc.up.Load() {
			running++
		}
	}
	var clients []*redis.Client // a Cluster's nodes count their own subscribers
	if c.nodes != nil {
		for _, addr := range c.nodes.Addrs() {
			rc := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
			defer rc.Close()
			clients = append(clients, rc)
		}
	} else {
		clients = append(clients, c.redisClient())
	}
	testproc.WaitFor(c.t, "every sidecar subscribes to the cluster's events", 10*time.Second, func() bool {
		ctx, cancel := redisContext()
		defer cancel()
		var subscribed int64
		for _, rc := range clients {
			n, err := rc.PubSubNumSub(ctx, eventsChannel).Result()
			if err != nil {
				return false
			}
			subscribed += n[eventsChannel]
		}
		return subscribed == int64(running)
	})
}

// redisClient is the test's own connection to the cluster's Redis.
func (c *cluster) redisClient() *redis.Client {
	rc := redis.NewClient(&redis.Options{Addr: c.redis.Addr(), MaxRetries: -1})
	c.t.Cleanup(func() { rc.Close() })
	return rc
}

// redisContext bounds a test's own Redis call.
func redisContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 5*time.Second)
}
