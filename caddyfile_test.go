package fortnox

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    Handler
		wantErr string // substring; "" = no error
	}{
		{
			name: "every option",
			input: `fortnox {
				client_id {env.ID}
				client_secret {file./run/secrets/x}
				token_url http://127.0.0.1:9/oauth-v1/token
				tenant_header X-Customer
				tenant acme 1234567
				tenant 7654321
				only_listed_tenants
				tenant_from_token
				refresh_before 2m
				token_timeout 3s
				retry_client_credentials 30m
				encryption_key {env.KEY} {env.OLD_KEY}
				account_header X-User
				max_token_requests 4
				rate_limit 20 4s
				max_wait 7s
				replay_body_limit 512KiB
			}`,
			want: Handler{
				ClientID:               "{env.ID}",
				ClientSecret:           "{file./run/secrets/x}",
				TokenURL:               "http://127.0.0.1:9/oauth-v1/token",
				TenantHeader:           "X-Customer",
				Tenants:                map[string]string{"acme": "1234567", "7654321": "7654321"},
				OnlyListedTenants:      true,
				TenantFromToken:        true,
				RefreshBefore:          caddy.Duration(2 * time.Minute),
				TokenTimeout:           caddy.Duration(3 * time.Second),
				RetryClientCredentials: caddy.Duration(30 * time.Minute),
				EncryptionKey:          "{env.KEY}",
				PreviousEncryptionKeys: []string{"{env.OLD_KEY}"},
				AccountHeader:          "X-User",
				MaxTokenRequests:       4,
				RateLimit:              &RateLimit{Requests: 20, Window: caddy.Duration(4 * time.Second)},
				MaxWait:                caddy.Duration(7 * time.Second),
				ReplayBodyLimit:        512 << 10,
			},
		},
		{name: "rate limit off", input: "fortnox {\n rate_limit off\n replay_body_limit off\n}", want: Handler{RateLimit: &RateLimit{Off: true}, ReplayBodyLimit: -1}},
		{name: "replay limit in bytes", input: "fortnox {\n replay_body_limit 1000\n}", want: Handler{ReplayBodyLimit: 1000}},
		{name: "rate limit one arg", input: "fortnox {\n rate_limit 25\n}", wantErr: "rate_limit takes a number of requests and a window"},
		{name: "rate limit zero", input: "fortnox {\n rate_limit 0 5s\n}", wantErr: `rate_limit: "0" is not a positive number`},
		{name: "rate limit bad window", input: "fortnox {\n rate_limit 25 soon\n}", wantErr: `rate_limit: "soon" is not a positive duration`},
		{name: "bad size", input: "fortnox {\n replay_body_limit lots\n}", wantErr: `replay_body_limit: "lots" is not a size`},
		{name: "bad max_wait", input: "fortnox {\n max_wait 0s\n}", wantErr: "max_wait must be positive"},
		{name: "empty block", input: `fortnox`, want: Handler{}},
		{name: "unknown option", input: "fortnox {\n\tclient_idd x\n}", wantErr: `unrecognized subdirective "client_idd", at Testfile:2`},
		{name: "argument on directive", input: `fortnox x`, wantErr: "wrong argument count"},
		{name: "client_id without value", input: "fortnox {\n client_id\n}", wantErr: "client_id needs a value, at Testfile:2"},
		{name: "client_secret with two values", input: "fortnox {\n client_secret a b\n}", wantErr: "client_secret takes exactly one value"},
		{name: "bad duration", input: "fortnox {\n refresh_before soon\n}", wantErr: `refresh_before: "soon" is not a duration`},
		{name: "negative duration", input: "fortnox {\n token_timeout -1s\n}", wantErr: "token_timeout must be positive"},
		{name: "tenant with three args", input: "fortnox {\n tenant a b c\n}", wantErr: "tenant takes a TenantId"},
		{name: "tenant not digits", input: "fortnox {\n tenant acme 12ab\n}", wantErr: `"12ab" is not a TenantId`},
		{name: "alias all digits", input: "fortnox {\n tenant 111 222\n}", wantErr: "is all digits"},
		{name: "alias declared twice", input: "fortnox {\n tenant acme 111\n tenant acme 222\n}", wantErr: "declared twice"},
		{name: "flag with argument", input: "fortnox {\n only_listed_tenants yes\n}", wantErr: "wrong argument count"},
		{name: "one encryption key", input: "fortnox {\n encryption_key {env.KEY}\n}", want: Handler{EncryptionKey: "{env.KEY}"}},
		{name: "encryption_key without value", input: "fortnox {\n encryption_key\n}", wantErr: "encryption_key needs a value"},
		{name: "max_token_requests zero", input: "fortnox {\n max_token_requests 0\n}", wantErr: `max_token_requests: "0" is not a positive number`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if !reflect.DeepEqual(h, tt.want) {
				t.Errorf("got %+v\nwant %+v", h, tt.want)
			}
		})
	}
}

// A secret given on a bad line must not be echoed in the error.
func TestUnmarshalCaddyfileDoesNotEchoSecret(t *testing.T) {
	var h Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("fortnox {\n client_secret {env.X} s3cr3t-value\n}"))
	if err == nil {
		t.Fatal("want an error")
	}
	if strings.Contains(err.Error(), "s3cr3t-value") {
		t.Errorf("error echoes the secret: %v", err)
	}
}
