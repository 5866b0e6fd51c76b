package fortnox

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// The app's 503 names the cause: Fortnox's own status, a name that does not
// resolve, a refused connection, a timeout.
func TestUnavailableAnswerNamesTheCause(t *testing.T) {
	refused := testproc.Addr(testproc.FreePort(t)) // nothing listens there
	tests := []struct {
		name    string
		options string
		setup   func(*fakefortnox.Server)
		want    []string
	}{
		{name: "Fortnox answered 503", setup: func(f *fakefortnox.Server) { f.SetFault(fakefortnox.Fault{Status: 503}) }, want: []string{"answered HTTP 503", "Fortnox's side"}},
		{name: "Fortnox answered 429", setup: func(f *fakefortnox.Server) { f.SetFault(fakefortnox.Fault{Status: 429}) }, want: []string{"answered HTTP 429"}},
		{name: "name does not resolve", options: "token_url https://tokens.caddy-fortnox.invalid/oauth-v1/token", want: []string{"DNS failure", "tokens.caddy-fortnox.invalid"}},
		{name: "connection refused", options: "token_url http://" + refused + "/oauth-v1/token", want: []string{"connection refused", refused}},
		{name: "timeout", options: "token_timeout 200ms", setup: func(f *fakefortnox.Server) { f.SetFault(fakefortnox.Fault{Delay: 2 * time.Second}) }, want: []string{"timed out", "token_timeout"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := startFake(t, fakefortnox.Options{RateLimit: -1})
			fake.GrantConsent(testClientID, "1234567")
			if tt.setup != nil {
				tt.setup(fake)
			}
			sc := startSidecar(t, fake, tt.options)
			status, body, resp := sc.get("/3/companyinformation", "1234567")
			if status != http.StatusServiceUnavailable {
				t.Fatalf("status %d, want 503: %s", status, body)
			}
			e := errorAnswer(t, resp, body)
			if e.Error != "token_endpoint_unavailable" {
				t.Errorf("error %q", e.Error)
			}
			for _, want := range tt.want {
				if !strings.Contains(e.Message, want) {
					t.Errorf("message %q does not say %q", e.Message, want)
				}
			}
			if strings.Contains(e.Message, "/oauth-v1") {
				t.Errorf("message names the token URL: %q", e.Message)
			}
		})
	}
}
