// Package replicas runs several real Caddy processes with the fortnox
// plugin on one shared storage (the file system, or Redis), against the
// fake Fortnox in this test process, to prove that refresh tokens, which
// Fortnox lets be used only once, survive restarts, replicas and crashes.
package replicas

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/caddybin"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/logscan"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

const (
	clientID     = "replica-client"
	clientSecret = "replica-secret-7d1e0f"
	// Short tokens so that a test walks through many refresh cycles:
	// refreshed 2s after issue (refresh_before 2s, never before half).
	lifetime = 4 * time.Second
)

var (
	logDir string
)

func TestMain(m *testing.M) {
	flag.Parse() // for testing.Short
	if testing.Short() {
		if !testproc.AnnounceSkip("test/replicas: the multi-process tests", "go test -short") {
			os.Exit(1)
		}
	} else if !testproc.CheckBinaries("test/replicas: TestThreeReplicasOnRedis", "redis-server") {
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "fortnox-replicas-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	logDir = dir
	code := m.Run()
	if code == 0 {
		if err := scanLogs(); err != nil {
			fmt.Fprintln(os.Stderr, "FAIL: log scan:", err)
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// scanLogs fails when any child's log holds a token or the secret.
func scanLogs() error {
	files, _ := filepath.Glob(filepath.Join(logDir, "*.log"))
	lines, err := logscan.Files(files, clientSecret)
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

// replica is one Caddy process.
type replica struct {
	t        *testing.T
	name     string
	proc     *testproc.Proc
	url      string
	adminURL string
	config   string
}

// startReplica starts a Caddy process with storageConfig as its storage.
func startReplica(t *testing.T, name string, fake *fakefortnox.Server, storageConfig string) *replica {
	t.Helper()
	bin := buildCaddy(t)
	port, adminPort := testproc.FreePort(t), testproc.FreePort(t)
	r := &replica{t: t, name: name, url: fmt.Sprintf("http://127.0.0.1:%d", port), adminURL: fmt.Sprintf("http://127.0.0.1:%d", adminPort)}
	r.config = filepath.Join(t.TempDir(), "Caddyfile")
	caddyfile := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	%s
	log {
		output file %s
		format json
		level DEBUG
	}
}

http://127.0.0.1:%d {
	bind 127.0.0.1
	fortnox {
		client_id {env.FORTNOX_CLIENT_ID}
		client_secret {env.FORTNOX_CLIENT_SECRET}
		token_url %s
		refresh_before 2s
		rotation_timeout 5s
		rate_limit off
		check_credentials off
	}
	reverse_proxy %s
}
`, adminPort, storageConfig, filepath.Join(logDir, t.Name()+"-"+name+".log"), port, fake.TokenURL(), fake.URL())
	if err := os.WriteFile(r.config, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "run", "--config", r.config, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "FORTNOX_CLIENT_ID="+clientID, "FORTNOX_CLIENT_SECRET="+clientSecret,
		"XDG_DATA_HOME="+t.TempDir(), "XDG_CONFIG_HOME="+t.TempDir(), "HOME="+t.TempDir())
	stderr, err := os.Create(filepath.Join(logDir, strings.ReplaceAll(t.Name(), "/", "_")+"-"+name+".stderr.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close() // the process has its own copy
	cmd.Stdout, cmd.Stderr = stderr, stderr
	if r.proc, err = testproc.Launch(cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.stop)
	r.waitReady()
	return r
}

func (r *replica) waitReady() {
	r.t.Helper()
	switch err := r.proc.WaitHTTP(r.adminURL+"/config/", 30*time.Second); {
	case errors.Is(err, testproc.ErrExited):
		r.t.Fatalf("%s exited while starting", r.name)
	case err != nil:
		r.t.Fatalf("%s did not start", r.name)
	}
}

// stop ends the process gracefully (SIGTERM; SIGKILL after 10 s).
func (r *replica) stop() {
	_ = r.proc.Stop(syscall.SIGTERM, 10*time.Second)
}

// kill ends the process with SIGKILL: no cleanup, locks left behind.
func (r *replica) kill() {
	r.proc.Kill()
}

var client = &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}

func (r *replica) get(tenant string) (int, string) {
	req, _ := http.NewRequest(http.MethodGet, r.url+"/3/companyinformation", nil)
	req.Header.Set("X-Fortnox-Tenant", tenant)
	resp, err := client.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (r *replica) putRefreshToken(tenant, rt string) {
	r.t.Helper()
	req, _ := http.NewRequest(http.MethodPut, r.adminURL+"/fortnox/tenants/"+tenant+"/refresh_token", strings.NewReader(`{"refresh_token":"`+rt+`"}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		r.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		b, _ := io.ReadAll(resp.Body)
		r.t.Fatalf("PUT refresh token: %d %s", resp.StatusCode, b)
	}
}

func startFake(t *testing.T) *fakefortnox.Server {
	t.Helper()
	return testproc.StartFake(t, fakefortnox.Options{
		Clients:       map[string]string{clientID: clientSecret},
		TokenLifetime: lifetime,
		RateLimit:     -1,
	})
}

func fileStorage(t *testing.T) string {
	return "storage file_system " + t.TempDir()
}

// A second process started on the same storage after the first stops
// continues the refresh-token chain: no new import needed.
func TestChainSurvivesRestart(t *testing.T) {
	fake := startFake(t)
	storage := fileStorage(t)
	first := startReplica(t, "first", fake, storage)
	first.putRefreshToken("1234567", fake.IssueRefreshToken(clientID, "1234567"))
	if status, body := first.get("1234567"); status != http.StatusOK {
		t.Fatalf("first: %d %s", status, body)
	}
	first.stop()

	second := startReplica(t, "second", fake, storage)
	for range 3 { // three refresh cycles on the second process
		if status, body := second.get("1234567"); status != http.StatusOK {
			t.Fatalf("second: %d %s", status, body)
		}
		time.Sleep(lifetime / 2)
	}
	if status, body := second.get("1234567"); status != http.StatusOK {
		t.Fatalf("second: %d %s", status, body)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant answers: the chain broke", n)
	}
	if n := fake.TokenRequests("refresh_token", "1234567"); n < 3 {
		t.Errorf("%d refreshes; the second process did not continue the chain", n)
	}
}

// Three processes on one storage, under load on the same refresh-token
// tenants for five token lifetimes: no invalid_grant, no failed request,
// and about one refresh per cycle per tenant for the whole group.
func TestThreeReplicasOnFileStorage(t *testing.T) {
	testThreeReplicas(t, fileStorage(t))
}

// The same on Redis, through the test-only storage module: the plugin
// needs no change for a networked store.
func TestThreeReplicasOnRedis(t *testing.T) {
	buildCaddy(t)
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	testThreeReplicas(t, fmt.Sprintf("storage fortnox_test_redis {\n\t\taddress %s\n\t\tprefix %s\n\t}", addr, "t"+fmt.Sprint(time.Now().UnixNano())))
}

func testThreeReplicas(t *testing.T, storage string) {
	fake := startFake(t)
	tenants := []string{"1234567", "7654321", "5550001"}
	var replicas []*replica
	for i := range 3 {
		replicas = append(replicas, startReplica(t, fmt.Sprintf("r%d", i), fake, storage))
	}
	for _, tn := range tenants {
		replicas[0].putRefreshToken(tn, fake.IssueRefreshToken(clientID, tn))
	}

	const duration = 5 * lifetime
	start := time.Now()
	var requests, failures atomic.Int64
	var firstFailure atomic.Value
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Since(start) < duration; i++ {
				r := replicas[(w+i)%len(replicas)]
				tn := tenants[(w+i/3)%len(tenants)]
				status, body := r.get(tn)
				requests.Add(1)
				if status != http.StatusOK {
					failures.Add(1)
					firstFailure.CompareAndSwap(nil, fmt.Sprintf("%s %s: %d %s", r.name, tn, status, body))
				}
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	t.Logf("%d requests over %v", requests.Load(), took)
	if n := failures.Load(); n != 0 {
		t.Errorf("%d of %d requests failed; first: %v", n, requests.Load(), firstFailure.Load())
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant answers: a refresh token was used twice", n)
	}
	// A token is refreshed half way through its life: one refresh per
	// lifetime/2 for the group, plus the first. Three replicas each
	// refreshing for themselves would make three times as many.
	cycles := int(took/(lifetime/2)) + 1
	for _, tn := range tenants {
		n := fake.TokenRequests("refresh_token", tn)
		t.Logf("tenant %s: %d refreshes in %d cycles", tn, n, cycles)
		if n > cycles+2 {
			t.Errorf("tenant %s: %d refreshes in %d cycles: replicas refreshed for themselves", tn, n, cycles)
		}
		if n < cycles/2 {
			t.Errorf("tenant %s: only %d refreshes in %d cycles", tn, n, cycles)
		}
	}
}

// A process killed with SIGKILL while it holds a tenant's storage lock,
// its refresh request unanswered: the others answer 503
// refresh_in_progress while its in-flight mark lives (Fortnox may have
// rotated the token), carry on once the mark is given up (rotation_timeout)
// and the lock goes stale, and the chain is intact.
func TestReplicaKilledHoldingTheLock(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("needs SIGKILL semantics of Linux")
	}
	fake := startFake(t)
	dir := t.TempDir()
	storage := "storage file_system " + dir
	a := startReplica(t, "a", fake, storage)
	b := startReplica(t, "b", fake, storage)
	a.putRefreshToken("1234567", fake.IssueRefreshToken(clientID, "1234567"))
	if status, body := a.get("1234567"); status != http.StatusOK {
		t.Fatalf("a: %d %s", status, body)
	}
	time.Sleep(lifetime) // the stored token is past its refresh time: the next request refreshes

	// a's refresh hangs at Fortnox while a holds the lock; then a dies.
	fake.SetFault(fakefortnox.Fault{Delay: time.Minute})
	go a.get("1234567")
	lockDir := filepath.Join(dir, "locks")
	if _, err := testproc.Poll(10*time.Second, func() bool {
		entries, _ := os.ReadDir(lockDir)
		return len(entries) > 0
	}); err != nil {
		t.Fatal("a never took the lock")
	}
	a.kill()
	fake.ClearFault()

	killed := time.Now()
	var status int
	var body string
	for {
		status, body = b.get("1234567")
		if status != http.StatusServiceUnavailable || !strings.Contains(body, `"refresh_in_progress"`) || time.Since(killed) > 20*time.Second {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	waited := time.Since(killed)
	if status != http.StatusOK {
		t.Fatalf("b after a died: %d %s", status, body)
	}
	t.Logf("b served the tenant %v after a was killed", waited)
	if waited > 20*time.Second {
		t.Errorf("b waited %v for a dead process's lock", waited)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant: the chain broke", n)
	}
	// The chain goes on.
	time.Sleep(lifetime)
	if status, body := b.get("1234567"); status != http.StatusOK {
		t.Fatalf("b later: %d %s", status, body)
	}
}
