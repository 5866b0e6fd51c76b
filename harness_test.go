package fortnox

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/logscan"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

const (
	testClientID     = "test-client"
	testClientSecret = "test-secret-0c1a8f3e9b" // distinctive, so the log scan can find it
)

// logFiles collects every log file the suite's Caddy instances write, for
// the secret scan in TestMain.
var (
	logFilesMu sync.Mutex
	logFiles   []string
)

func TestMain(m *testing.M) {
	if !testproc.CheckBinaries("caddy-fortnox (root package): the tests that need Redis", "redis-server") {
		os.Exit(1) // in CI nothing may skip
	}
	dir, err := os.MkdirTemp("", "caddy-fortnox-logs-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	suiteLogDir = dir
	// Caddy's data directory holds the default journal_dir: the suite's
	// own, not the user's.
	if err := os.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	if code == 0 {
		if err := scanLogsForSecrets(); err != nil {
			fmt.Fprintln(os.Stderr, "FAIL: log scan:", err)
			code = 1
		}
	}
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

var suiteLogDir string

// secretPatterns match what must never be logged: tokens and the secret.
var secretPatterns = logscan.Patterns(testClientSecret)

// scanLogsForSecrets reads every log line of the suite; it fails on any
// line holding a token or secret, and when no line was read at all (a scan
// of nothing proves nothing).
func scanLogsForSecrets() error {
	logFilesMu.Lock()
	defer logFilesMu.Unlock()
	lines, err := logscan.Files(logFiles, testClientSecret)
	if err != nil {
		return err
	}
	if lines == 0 && len(logFiles) > 0 {
		return fmt.Errorf("no log lines in %d files: the scan proves nothing", len(logFiles))
	}
	fmt.Printf("log scan: %d lines in %d files, no token or secret\n", lines, len(logFiles))
	return nil
}

// startFake starts a fake Fortnox that knows the test client.
func startFake(t testing.TB, opts fakefortnox.Options) *fakefortnox.Server {
	t.Helper()
	if opts.Clients == nil {
		opts.Clients = map[string]string{testClientID: testClientSecret}
	}
	fake, err := fakefortnox.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fake.Close)
	return fake
}

// sidecar is a running Caddy with the fortnox handler in front of a fake.
type sidecar struct {
	t        testing.TB
	fake     *fakefortnox.Server
	url      string // http://127.0.0.1:port
	adminURL string
	dir      string // storage and logs
	client   *http.Client
	caddyfileTemplate
}

type caddyfileTemplate struct {
	port, adminPort int
	tokenURL        string
	upstream        string
	options         string // extra lines inside the fortnox block
	extraSites      string // more site blocks, appended to the Caddyfile
	adminListen     string // the admin option; empty: 127.0.0.1:<adminPort>
	siteLines       string // more lines inside the proxy's own site block
}

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startSidecar loads a Caddy config with a fortnox block (plus options)
// proxying to fake. The client secret reaches Caddy through {env.*}, as in
// production.
func startSidecar(t testing.TB, fake *fakefortnox.Server, options string) *sidecar {
	t.Helper()
	return startSidecarSite(t, fake, options, "")
}

// startSidecarSite is startSidecar with more lines in the proxy's own site
// block (siteLines), there from the first load.
func startSidecarSite(t testing.TB, fake *fakefortnox.Server, options, siteLines string) *sidecar {
	t.Helper()
	t.Setenv("FORTNOX_TEST_CLIENT_ID", testClientID)
	t.Setenv("FORTNOX_TEST_CLIENT_SECRET", testClientSecret)
	s := &sidecar{
		t:    t,
		fake: fake,
		dir:  t.TempDir(),
		caddyfileTemplate: caddyfileTemplate{
			port:      freePort(t),
			adminPort: freePort(t),
			tokenURL:  fake.TokenURL(),
			upstream:  fake.URL(),
			options:   options,
			siteLines: siteLines,
		},
		client: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 256}},
	}
	s.url = fmt.Sprintf("http://127.0.0.1:%d", s.port)
	s.adminURL = fmt.Sprintf("http://127.0.0.1:%d", s.adminPort)
	logFilesMu.Lock()
	logFiles = append(logFiles, s.logPath(), s.accessLogPath())
	logFilesMu.Unlock()
	if err := s.load(); err != nil {
		t.Fatalf("loading the config: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Logf("stopping caddy: %v", err)
		}
		if t.Failed() {
			s.dumpLog()
		}
	})
	return s
}

func (s *sidecar) logPath() string {
	// Caddy evaluates placeholders in log file names: keep only plain characters.
	name := regexp.MustCompile(`[^A-Za-z0-9_-]+`).ReplaceAllString(s.t.Name(), "_")
	return filepath.Join(suiteLogDir, fmt.Sprintf("%.80s-%d.log", name, s.port))
}

func (s *sidecar) accessLogPath() string {
	return strings.TrimSuffix(s.logPath(), ".log") + "-access.log"
}

func (s *sidecar) caddyfile() string {
	admin := s.adminListen
	if admin == "" {
		admin = fmt.Sprintf("127.0.0.1:%d", s.adminPort)
	}
	return fmt.Sprintf(`{
	admin %s
	persist_config off
	storage file_system %s
	log {
		output file %s
		format json
		level DEBUG
	}
}

http://127.0.0.1:%d {
	bind 127.0.0.1
	log {
		output file %s
		format json
	}%s
	fortnox {
		client_id {env.FORTNOX_TEST_CLIENT_ID}
		client_secret {env.FORTNOX_TEST_CLIENT_SECRET}
		check_credentials off
		token_url %s%s
	}
	reverse_proxy %s
}
%s`, admin, filepath.Join(s.dir, "storage"), s.logPath(), s.port, s.accessLogPath(), s.siteLines, s.tokenURL,
		indentOptions(s.options), s.upstream, s.extraSites)
}

// indentOptions puts each option line on its own, indented line, so the
// generated Caddyfile is formatted (Caddy warns otherwise).
func indentOptions(options string) string {
	var b strings.Builder
	for _, line := range strings.Split(options, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			b.WriteString("\n\t\t" + line)
		}
	}
	return b.String()
}

// load (re)loads the sidecar's config into the running Caddy.
func (s *sidecar) load() error {
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(s.caddyfile()), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return err
	}
	for _, w := range warnings {
		s.t.Logf("adapt warning: %s", w)
	}
	err = caddy.Load(cfg, true)
	// Connections kept alive to the old servers are closed by the load.
	if s.client != nil {
		s.client.CloseIdleConnections()
	}
	return err
}

func (s *sidecar) dumpLog() {
	b, err := os.ReadFile(s.logPath())
	if err != nil {
		return
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	s.t.Logf("last Caddy log lines:\n%s", strings.Join(lines, "\n"))
}

// logLines returns the Caddy log lines (not the access log) whose msg is msg.
func (s *sidecar) logLines(msg string) []map[string]any {
	return s.logLinesWhere(func(m string) bool { return m == msg })
}

// logLinesStarting returns the Caddy log lines whose msg starts with prefix.
func (s *sidecar) logLinesStarting(prefix string) []map[string]any {
	return s.logLinesWhere(func(m string) bool { return strings.HasPrefix(m, prefix) })
}

func (s *sidecar) logLinesWhere(match func(msg string) bool) []map[string]any {
	b, err := os.ReadFile(s.logPath())
	if err != nil {
		s.t.Fatal(err)
	}
	var out []map[string]any
	for _, line := range strings.Split(string(b), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil {
			if msg, ok := m["msg"].(string); ok && match(msg) {
				out = append(out, m)
			}
		}
	}
	return out
}

// get sends a request for tenant ("" = no tenant header) and returns the
// status, body and response.
func (s *sidecar) do(method, path, tenant string, body io.Reader, header http.Header) (int, []byte, *http.Response) {
	s.t.Helper()
	var sent []byte // the body, to send again
	if body != nil {
		var err error
		if sent, err = io.ReadAll(body); err != nil {
			s.t.Fatal(err)
		}
	}
	newRequest := func() *http.Request {
		var b io.Reader
		if body != nil {
			b = bytes.NewReader(sent)
		}
		req, err := http.NewRequest(method, s.url+path, b)
		if err != nil {
			s.t.Fatal(err)
		}
		for k, vs := range header {
			req.Header[k] = vs
		}
		if tenant != "" {
			req.Header.Set(DefaultTenantHeader, tenant)
		}
		return req
	}
	resp, err := s.client.Do(newRequest())
	if err != nil {
		// A config load replaces Caddy's servers: a connection the old
		// server accepted just before it stopped is closed unanswered,
		// or refused while the listener changes hands. Once, on a fresh
		// connection (a request that reached the handler and spent a
		// token would show at the fake, which the tests count).
		s.client.CloseIdleConnections()
		time.Sleep(20 * time.Millisecond)
		resp, err = s.client.Do(newRequest())
	}
	if err != nil {
		s.t.Fatalf("%s %s for %q: %v", method, path, tenant, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatal(err)
	}
	return resp.StatusCode, b, resp
}

func (s *sidecar) get(path, tenant string) (int, []byte, *http.Response) {
	s.t.Helper()
	return s.do(http.MethodGet, path, tenant, nil, nil)
}

// manager returns the token manager the sidecar's handler uses.
func (s *sidecar) manager() *tokens.Manager {
	var found *tokens.Manager
	managers.Range(func(_, v any) bool {
		if m := v.(*tokens.Manager); m.TokenURL == s.tokenURL && m.ClientID() == testClientID {
			found = m
			return false
		}
		return true
	})
	if found == nil {
		s.t.Fatal("no token manager for the sidecar")
	}
	return found
}

// advance moves the plugin's clock and the fake's together.
func advance(fake *fakefortnox.Server, d time.Duration) {
	clk.Advance(d)
	fake.Advance(d)
}

// eventually polls cond until it holds or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// companyNumber returns DatabaseNumber from a /3/companyinformation answer.
func companyNumber(t testing.TB, body []byte) string {
	t.Helper()
	var v struct {
		CompanyInformation struct {
			DatabaseNumber json.Number
		}
	}
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatalf("not company information: %v: %s", err, body)
	}
	return v.CompanyInformation.DatabaseNumber.String()
}

// errorAnswer decodes the sidecar's JSON error answer and checks its form.
func errorAnswer(t testing.TB, resp *http.Response, body []byte) errorBody {
	t.Helper()
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	var e errorBody
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("error body is not JSON: %v: %s", err, body)
	}
	if e.Error == "" || e.Message == "" {
		t.Errorf("error body lacks error or message: %s", body)
	}
	if strings.Contains(string(body), testClientSecret) {
		t.Errorf("error body holds the client secret: %s", body)
	}
	return e
}

// stopCaddy unloads the running config.
func stopCaddy() error { return caddy.Stop() }
