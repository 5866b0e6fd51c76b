package fortnox

import (
	"encoding/json"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// shortCredCheckDelay makes the check fire soon after start in this test.
func shortCredCheckDelay(t *testing.T) {
	t.Helper()
	old := tokens.CredCheckDelay
	tokens.CredCheckDelay = 50 * time.Millisecond
	t.Cleanup(func() { tokens.CredCheckDelay = old })
}

// checkLines returns the credential check's log lines.
func (s *sidecar) checkLines() []map[string]any {
	s.t.Helper()
	b, err := os.ReadFile(s.logPath())
	if err != nil {
		s.t.Fatal(err)
	}
	var out []map[string]any
	for _, line := range strings.Split(string(b), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil {
			continue
		}
		if msg, _ := m["msg"].(string); strings.HasPrefix(msg, "credential check") {
			out = append(out, m)
		}
	}
	return out
}

// waitForCheck waits for the credential check's one log line.
func (s *sidecar) waitForCheck() map[string]any {
	s.t.Helper()
	eventually(s.t, 10*time.Second, "the credential check's log line", func() bool { return len(s.checkLines()) > 0 })
	lines := s.checkLines()
	if len(lines) != 1 {
		s.t.Fatalf("%d credential check lines, want 1: %v", len(lines), lines)
	}
	return lines[0]
}

// A wrong client secret is reported at start, as an ERROR that says what
// to check, after one request that mints nothing.
func TestCredentialCheckWrongSecret(t *testing.T) {
	shortCredCheckDelay(t)
	fake := startFake(t, fakefortnox.Options{Clients: map[string]string{testClientID: "another-secret"}})
	sc := startSidecar(t, fake, "check_credentials on")
	line := sc.waitForCheck()
	if line["level"] != "error" {
		t.Errorf("level %v, want error: %v", line["level"], line)
	}
	msg, _ := line["msg"].(string)
	for _, want := range []string{"REJECTED the client id or client secret", "client_secret"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q does not say %q", msg, want)
		}
	}
	if line["client_id"] != testClientID || line["error_code"] != "invalid_client" {
		t.Errorf("fields: %v", line)
	}
	if n := fake.TokenRequests("refresh_token", ""); n != 1 {
		t.Errorf("%d refresh-grant requests, want 1", n)
	}
	if n := fake.TokenRequests("", ""); n != 1 {
		t.Errorf("%d token requests, want 1", n)
	}
}

// Right credentials: one refresh-grant request with a refresh token that
// cannot exist, answered invalid_grant, and no error logged.
func TestCredentialCheckRightSecret(t *testing.T) {
	shortCredCheckDelay(t)
	fake := startFake(t, fakefortnox.Options{})
	sc := startSidecar(t, fake, "check_credentials on")
	line := sc.waitForCheck()
	if line["level"] != "info" || !strings.Contains(line["msg"].(string), "accepts the client id and secret") {
		t.Errorf("check line: %v", line)
	}
	if n := fake.TokenRequests("refresh_token", ""); n != 1 {
		t.Errorf("%d refresh-grant requests, want 1", n)
	}
	if n := fake.TokenRequests("", ""); n != 1 {
		t.Errorf("%d token requests, want 1 (the check mints nothing)", n)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 1 {
		t.Errorf("%d invalid_grant answers, want 1", n)
	}
	// Once per token manager: a reload with the same credentials does
	// not check again.
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if n := fake.TokenRequests("", ""); n != 1 {
		t.Errorf("after a reload: %d token requests, want still 1", n)
	}
}

// A reload that changes the secret checks the new one.
func TestCredentialCheckAfterTheSecretChanges(t *testing.T) {
	shortCredCheckDelay(t)
	fake := startFake(t, fakefortnox.Options{Clients: map[string]string{testClientID: "the-right-secret-5b2e"}})
	sc := startSidecar(t, fake, "check_credentials on")
	if line := sc.waitForCheck(); line["level"] != "error" {
		t.Fatalf("with the wrong secret: %v", line)
	}
	t.Setenv("FORTNOX_TEST_CLIENT_SECRET", "the-right-secret-5b2e")
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "a second check", func() bool { return len(sc.checkLines()) == 2 })
	if line := sc.checkLines()[1]; line["level"] != "info" {
		t.Errorf("with the right secret: %v", line)
	}
	if n := fake.TokenRequests("", ""); n != 2 {
		t.Errorf("%d token requests, want 2", n)
	}
}

// An endpoint that cannot be reached is a WARN that names the cause.
func TestCredentialCheckUnreachable(t *testing.T) {
	shortCredCheckDelay(t)
	fake := startFake(t, fakefortnox.Options{})
	refused := testproc.Addr(testproc.FreePort(t)) // nothing listens there
	sc := startSidecar(t, fake, "check_credentials on\ntoken_url http://"+refused+"/oauth-v1/token")
	line := sc.waitForCheck()
	if line["level"] != "warn" || !strings.Contains(line["msg"].(string), "cannot be reached") {
		t.Errorf("check line: %v", line)
	}
	if cause, _ := line["cause"].(string); !strings.Contains(cause, "connection refused") {
		t.Errorf("cause %q does not say connection refused", cause)
	}
}

// Fortnox's own 5xx is a WARN naming the status, not a verdict on the
// credentials.
func TestCredentialCheckFortnoxFailing(t *testing.T) {
	shortCredCheckDelay(t)
	fake := startFake(t, fakefortnox.Options{})
	fake.SetFault(fakefortnox.Fault{Status: 503})
	sc := startSidecar(t, fake, "check_credentials on")
	line := sc.waitForCheck()
	if line["level"] != "warn" || !strings.Contains(line["cause"].(string), "answered HTTP 503") {
		t.Errorf("check line: %v", line)
	}
}

// check_credentials off makes no request at all.
func TestCredentialCheckOff(t *testing.T) {
	shortCredCheckDelay(t)
	fake := startFake(t, fakefortnox.Options{})
	sc := startSidecar(t, fake, "check_credentials off")
	time.Sleep(300 * time.Millisecond)
	if n := fake.TokenRequests("", ""); n != 0 {
		t.Errorf("%d token requests, want none", n)
	}
	if lines := sc.checkLines(); len(lines) != 0 {
		t.Errorf("check lines: %v", lines)
	}
}

// `caddy validate` provisions and cleans up at once: the check never
// reaches the network, and the destroyed manager is forgotten.
func TestCredentialCheckNotDuringValidate(t *testing.T) {
	shortCredCheckDelay(t)
	fake := startFake(t, fakefortnox.Options{})
	t.Setenv("FORTNOX_TEST_CLIENT_ID", testClientID)
	t.Setenv("FORTNOX_TEST_CLIENT_SECRET", testClientSecret)
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(`{
	admin off
	persist_config off
	storage file_system `+t.TempDir()+`
}
http://127.0.0.1:`+strconv.Itoa(freePort(t))+` {
	fortnox {
		client_id {env.FORTNOX_TEST_CLIENT_ID}
		client_secret {env.FORTNOX_TEST_CLIENT_SECRET}
		token_url `+fake.TokenURL()+`
	}
	reverse_proxy `+fake.URL()+`
}`), nil)
	if err != nil {
		t.Fatal(err)
	}
	var cfg caddy.Config
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	if err := caddy.Validate(&cfg); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * tokens.CredCheckDelay)
	if n := fake.TokenRequests("", ""); n != 0 {
		t.Errorf("validate made %d token requests, want none", n)
	}
	tokens.CredChecked.Range(func(k, _ any) bool {
		if m := k.(*tokens.Manager); m.TokenURL == fake.TokenURL() {
			t.Error("the validated config's destroyed manager is still remembered")
		}
		return true
	})
}

func TestCheckCredentialsCaddyfile(t *testing.T) {
	on, off := true, false
	for input, want := range map[string]*bool{
		"fortnox {\n check_credentials on\n}":  &on,
		"fortnox {\n check_credentials off\n}": &off,
		"fortnox {\n}":                         nil,
	} {
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
			t.Fatalf("%q: %v", input, err)
		}
		if !reflect.DeepEqual(h.CheckCredentials, want) {
			t.Errorf("%q: CheckCredentials = %v, want %v", input, h.CheckCredentials, want)
		}
		// The JSON twin: check_credentials, absent when not set.
		raw, _ := json.Marshal(&h)
		if got := strings.Contains(string(raw), `"check_credentials"`); got != (want != nil) {
			t.Errorf("%q: JSON %s", input, raw)
		}
	}
	for input, wantErr := range map[string]string{
		"fortnox {\n check_credentials\n}":        "check_credentials needs a value",
		"fortnox {\n check_credentials yes\n}":    `check_credentials: "yes" is neither on nor off`,
		"fortnox {\n check_credentials on off\n}": "check_credentials takes exactly one value",
	} {
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%q: err = %v, want %q", input, err, wantErr)
		}
	}
}
