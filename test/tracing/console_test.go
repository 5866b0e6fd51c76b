// Package tracing runs a real Caddy process with the fortnox plugin under
// Caddy's `tracing` directive and OTEL_TRACES_EXPORTER=console, and reads
// the spans it prints: what an operator sees who turns tracing on.
package tracing

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/caddybin"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/logscan"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

const (
	clientID     = "tracing-client"
	clientSecret = "tracing-secret-5b2e91c7"
)

// consoleSpan is a span as the console exporter prints it.
type consoleSpan struct {
	Name        string
	SpanContext struct{ TraceID, SpanID string }
	Parent      struct{ SpanID string }
	Attributes  []struct {
		Key   string
		Value struct{ Value any }
	}
}

func (s consoleSpan) attr(key string) string {
	for _, a := range s.Attributes {
		if a.Key == key {
			return fmt.Sprint(a.Value.Value)
		}
	}
	return ""
}

// The console exporter shows the plugin's spans with their attributes,
// and never a token or the secret.
func TestConsoleExporterShowsFortnoxSpans(t *testing.T) {
	dir := t.TempDir()
	bin := caddybin.Build(t, dir)
	fake := testproc.StartFake(t, fakefortnox.Options{RateLimit: -1, Clients: map[string]string{clientID: clientSecret}})
	fake.GrantConsent(clientID, "1234567")

	port, adminPort := testproc.FreePort(t), testproc.FreePort(t)
	config := filepath.Join(dir, "Caddyfile")
	logFile := filepath.Join(dir, "caddy.log")
	if err := os.WriteFile(config, []byte(fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	storage file_system %s
	log {
		output file %s
		format json
	}
}

http://127.0.0.1:%d {
	bind 127.0.0.1
	tracing {
		span sidecar
	}
	fortnox {
		client_id {env.FORTNOX_CLIENT_ID}
		client_secret {env.FORTNOX_CLIENT_SECRET}
		token_url %s
		rate_limit 1 3s
		check_credentials off
	}
	reverse_proxy %s
}
`, adminPort, filepath.Join(dir, "storage"), logFile, port, fake.TokenURL(), fake.URL())), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout := filepath.Join(dir, "stdout")
	out, err := os.Create(stdout)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close() // the process has its own copy
	cmd := exec.Command(bin, "run", "--config", config, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "FORTNOX_CLIENT_ID="+clientID, "FORTNOX_CLIENT_SECRET="+clientSecret,
		"OTEL_TRACES_EXPORTER=console", "OTEL_BSP_SCHEDULE_DELAY=10",
		"XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir, "HOME="+dir)
	errOut, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer errOut.Close()
	cmd.Stdout, cmd.Stderr = out, errOut
	proc := testproc.Start(t, cmd) // killed when the test ends
	switch err := proc.WaitHTTP(fmt.Sprintf("http://127.0.0.1:%d/config/", adminPort), 60*time.Second); {
	case errors.Is(err, testproc.ErrExited):
		t.Fatal("caddy exited while starting")
	case err != nil:
		t.Fatal("caddy did not start")
	}

	url := fmt.Sprintf("http://127.0.0.1:%d/3/companyinformation", port)
	for i := range 2 { // a cold token, then a cached one that waits for its turn
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("X-Fortnox-Tenant", "1234567")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: status %d", i, resp.StatusCode)
		}
	}
	// A graceful stop flushes every span.
	if err := proc.Stop(syscall.SIGTERM, 20*time.Second); err != nil {
		t.Fatal("caddy did not stop")
	}

	spans := readSpans(t, stdout)
	byName := map[string][]consoleSpan{}
	for _, s := range spans {
		byName[s.Name] = append(byName[s.Name], s)
	}
	if len(byName["fortnox.token"]) != 1 || len(byName["fortnox.token_request"]) != 1 || len(byName["fortnox.rate_limit"]) != 1 || len(byName["sidecar"]) != 2 {
		t.Fatalf("spans printed: %v; want one fortnox.token, fortnox.token_request and fortnox.rate_limit, two request spans", names(spans))
	}
	token, request, wait := byName["fortnox.token"][0], byName["fortnox.token_request"][0], byName["fortnox.rate_limit"][0]
	for _, c := range []struct {
		span      consoleSpan
		key, want string
	}{
		{token, "fortnox.tenant", "1234567"},
		{token, "fortnox.grant", "client_credentials"},
		{token, "fortnox.outcome", "ok"},
		{request, "fortnox.tenant", "1234567"},
		{request, "fortnox.grant", "client_credentials"},
		{request, "fortnox.outcome", "ok"},
		{request, "http.response.status_code", "200"},
		{wait, "fortnox.tenant", "1234567"},
		{wait, "fortnox.outcome", "ok"},
	} {
		if got := c.span.attr(c.key); got != c.want {
			t.Errorf("%s: %s = %q, want %q", c.span.Name, c.key, got, c.want)
		}
	}
	if request.Parent.SpanID != token.SpanContext.SpanID {
		t.Errorf("fortnox.token_request's parent is %s, not the fortnox.token span %s", request.Parent.SpanID, token.SpanContext.SpanID)
	}
	requestSpans := map[string]bool{byName["sidecar"][0].SpanContext.SpanID: true, byName["sidecar"][1].SpanContext.SpanID: true}
	if !requestSpans[token.Parent.SpanID] || !requestSpans[wait.Parent.SpanID] {
		t.Errorf("fortnox.token (parent %s) and fortnox.rate_limit (parent %s) are not children of request spans", token.Parent.SpanID, wait.Parent.SpanID)
	}
	if _, err := logscan.Files([]string{stdout, logFile, filepath.Join(dir, "stderr")}, clientSecret); err != nil {
		t.Error(err)
	}
}

// readSpans reads the console exporter's JSON spans among Caddy's output.
func readSpans(t *testing.T, path string) []consoleSpan {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var spans []consoleSpan
	dec := json.NewDecoder(bufio.NewReader(f))
	for dec.More() {
		var raw map[string]any
		if err := dec.Decode(&raw); err != nil {
			break
		}
		if _, ok := raw["SpanContext"]; !ok {
			continue // a log line
		}
		b, _ := json.Marshal(raw)
		var s consoleSpan
		if err := json.Unmarshal(b, &s); err != nil {
			t.Fatal(err)
		}
		spans = append(spans, s)
	}
	return spans
}

func names(spans []consoleSpan) string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name)
	}
	return strings.Join(out, ", ")
}
