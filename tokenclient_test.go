package fortnox

import (
	"strings"
	"testing"
	"time"
)

func TestParseTokenAnswer(t *testing.T) {
	jwt := fakeJWT(`{"tenantId":1,"iat":1000,"exp":1600}`)
	tests := []struct {
		name         string
		status       int
		body         string
		wantFailure  tokenFailure
		wantLifetime time.Duration
	}{
		{name: "client credentials", status: 200, body: `{"access_token":"abc","token_type":"bearer","expires_in":3600,"scope":"x"}`, wantLifetime: time.Hour},
		{name: "token type in capitals", status: 200, body: `{"access_token":"abc","token_type":"Bearer","expires_in":60}`, wantLifetime: time.Minute},
		{name: "expires_in as string", status: 200, body: `{"access_token":"abc","expires_in":"120"}`, wantLifetime: 2 * time.Minute},
		{name: "missing expires_in reads the JWT", status: 200, body: `{"access_token":"` + jwt + `"}`, wantLifetime: 600 * time.Second},
		{name: "absurd expires_in reads the JWT", status: 200, body: `{"access_token":"` + jwt + `","expires_in":99999999999}`, wantLifetime: 600 * time.Second},
		{name: "negative expires_in, no JWT", status: 200, body: `{"access_token":"abc","expires_in":-5}`, wantLifetime: time.Hour},
		{name: "not bearer", status: 200, body: `{"access_token":"abc","token_type":"mac"}`, wantFailure: failBadAnswer},
		{name: "no access token", status: 200, body: `{"token_type":"bearer"}`, wantFailure: failBadAnswer},
		{name: "html 200", status: 200, body: `<html>maintenance</html>`, wantFailure: failBadAnswer},
		{name: "error in 200", status: 200, body: `{"error":"invalid_client"}`, wantFailure: failBadClient},
		{name: "invalid_client as text/plain", status: 401, body: `{"error":"invalid_client","error_description":"The client credentials are invalid"}`, wantFailure: failBadClient},
		{name: "invalid_grant", status: 400, body: `{"error":"invalid_grant","error_description":"Invalid refresh token"}`, wantFailure: failNoConsent},
		{name: "unauthorized_client", status: 400, body: `{"error":"unauthorized_client"}`, wantFailure: failNoConsent},
		{name: "403 without body", status: 403, body: ``, wantFailure: failNoConsent},
		{name: "401 not JSON", status: 401, body: `Unauthorized`, wantFailure: failNoConsent},
		{name: "500", status: 500, body: `oops`, wantFailure: failUnavailable},
		{name: "503 JSON", status: 503, body: `{"error":"temporarily_unavailable"}`, wantFailure: failUnavailable},
		{name: "429", status: 429, body: ``, wantFailure: failUnavailable},
		{name: "redirect", status: 302, body: ``, wantFailure: failBadAnswer},
		{name: "huge", status: 200, body: `{"access_token":"` + strings.Repeat("a", maxTokenAnswer) + `"}`, wantFailure: failBadAnswer},
		// Found by FuzzParseTokenAnswer: an answer over the size limit was
		// "unusable" (502) whatever its status; a 5xx or 429 is "try later".
		// A 4xx over the limit stays unusable: it is not read, so it cannot
		// say invalid_grant, and must not mark a refresh token dead.
		{name: "huge 503 page", status: 503, body: `<html>` + strings.Repeat("x", maxTokenAnswer) + `</html>`, wantFailure: failUnavailable},
		{name: "huge 429", status: 429, body: strings.Repeat(" ", maxTokenAnswer+1), wantFailure: failUnavailable},
		{name: "huge 400", status: 400, body: `{"error":"invalid_grant","error_description":"` + strings.Repeat("y", maxTokenAnswer) + `"}`, wantFailure: failBadAnswer},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := parseTokenAnswer(tt.status, "", []byte(tt.body))
			if tt.wantFailure != 0 {
				terr, ok := err.(*tokenError)
				if !ok {
					t.Fatalf("err = %v, want a tokenError", err)
				}
				if terr.failure != tt.wantFailure {
					t.Fatalf("failure = %d (%v), want %d", terr.failure, terr, tt.wantFailure)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if a.lifetime != tt.wantLifetime {
				t.Errorf("lifetime = %v, want %v", a.lifetime, tt.wantLifetime)
			}
		})
	}
}

func TestTokenErrorRetryAfterFromFortnox(t *testing.T) {
	_, err := parseTokenAnswer(503, "30", []byte("down"))
	terr := err.(*tokenError)
	if got := terr.retryAt.Sub(now()); got < 29*time.Second || got > 31*time.Second {
		t.Errorf("retryAt in %v, want about 30s", got)
	}
}

func TestTokenErrorTextHasNoBody(t *testing.T) {
	_, err := parseTokenAnswer(400, "", []byte(`{"error":"invalid_grant","error_description":"bad","refresh_token":"rt-secret"}`))
	if strings.Contains(err.Error(), "rt-secret") {
		t.Errorf("error text repeats the body: %v", err)
	}
}

func TestRefreshAheadAfter(t *testing.T) {
	if got := refreshAheadAfter(time.Hour, 5*time.Minute); got != 55*time.Minute {
		t.Errorf("1h token: %v", got)
	}
	if got := refreshAheadAfter(time.Minute, 5*time.Minute); got != 30*time.Second {
		t.Errorf("1m token: %v", got)
	}
}

func TestBackoffDelayGrowsAndCaps(t *testing.T) {
	for n, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: 4 * time.Second, 7: time.Minute, 50: time.Minute} {
		got := backoffDelay(n)
		if got < want*8/10 || got > want*12/10 {
			t.Errorf("backoffDelay(%d) = %v, want %v ±20%%", n, got, want)
		}
	}
}
