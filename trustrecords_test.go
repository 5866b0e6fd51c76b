package fortnox

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// The trust boundary, as far as stored records and the log go: a refresh
// token goes only to the token URL it came from; with encryption_key, an
// unencrypted record is never served (and `caddy fortnox encrypt` fixes
// that); a stranger cannot flood the log.

// An http:// token URL is accepted only on loopback, in every module that
// takes one; a config that names another is refused at load, saying why.
func TestTokenURLMustBeHTTPSOffLoopback(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{})
	t.Setenv("FORTNOX_TEST_WEBHOOK_SECRET", testWebhookSecret)
	t.Setenv("FORTNOX_TEST_COOKIE_SECRET", testCookieSecret)
	const remote = "http://tokens.example.com/oauth-v1/token"
	webhook := func(tokenURL string) string {
		return fmt.Sprintf(`
http://127.0.0.1:%d {
	fortnox_webhook {
		client_id {env.FORTNOX_TEST_CLIENT_ID}
		token_url %s
		secret {env.FORTNOX_TEST_WEBHOOK_SECRET}
	}
}
`, freePort(t), tokenURL)
	}
	connect := func(tokenURL string) string {
		return fmt.Sprintf(`
http://127.0.0.1:%[1]d {
	fortnox_connect {
		client_id {env.FORTNOX_TEST_CLIENT_ID}
		token_url %[2]s
		scopes companyinformation
		redirect_uri http://127.0.0.1:%[1]d/fortnox/callback
		cookie_secret {env.FORTNOX_TEST_COOKIE_SECRET}
	}
}
`, freePort(t), tokenURL)
	}
	tests := []struct {
		name, tokenURL, extra string
		ok                    bool
	}{
		{name: "fortnox, http elsewhere", tokenURL: remote},
		{name: "fortnox, http on a private address", tokenURL: "http://10.0.0.7/oauth-v1/token"},
		{name: "fortnox_webhook, http elsewhere", extra: webhook(remote)},
		{name: "fortnox_connect, http elsewhere", extra: connect(remote)},
		{name: "fortnox, http on 127.0.0.1", ok: true},
		{name: "fortnox, http on localhost", tokenURL: strings.Replace(fake.TokenURL(), "127.0.0.1", "localhost", 1), ok: true},
		{name: "fortnox, http on ::1", tokenURL: "http://[::1]:9/oauth-v1/token", ok: true},
		{name: "fortnox, https elsewhere", tokenURL: "https://tokens.example.com/oauth-v1/token", ok: true},
		{name: "webhook and connect, http on loopback", extra: webhook(fake.TokenURL()) + connect(fake.TokenURL()), ok: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("FORTNOX_TEST_CLIENT_ID", testClientID)
			t.Setenv("FORTNOX_TEST_CLIENT_SECRET", testClientSecret)
			sc := &sidecar{t: t, fake: fake, dir: t.TempDir()}
			tokenURL := tokens.CmpOr(tt.tokenURL, fake.TokenURL())
			sc.caddyfileTemplate = caddyfileTemplate{port: freePort(t), adminPort: freePort(t), tokenURL: tokenURL, upstream: fake.URL(), extraSites: tt.extra}
			err := sc.load()
			t.Cleanup(func() { _ = stopCaddy() })
			if tt.ok {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("loaded, want an error")
			}
			if !strings.Contains(err.Error(), "http:// is accepted only on loopback (127.0.0.1, ::1, localhost); use https://") {
				t.Errorf("error does not say why: %v", err)
			}
		})
	}
}

// A record stamped with the token URL it came from is never sent to
// another: after token_url is changed, the tenant gets 503
// token_storage_unavailable (the message names neither URL), the new token
// endpoint receives no refresh-token grant, the record is not touched, one
// log line names both URLs, and an admin PUT does not overwrite it. With
// the old token_url back, the tenant is served again.
func TestRecordGoesOnlyToItsTokenURL(t *testing.T) {
	first := startFake(t, fakefortnox.Options{RateLimit: -1})
	second := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, first, "")
	sc.putRefreshToken("1234567", first.IssueRefreshToken(testClientID, "1234567"))
	if rec := sc.storedRecord("1234567"); rec.TokenURL != first.TokenURL() {
		t.Fatalf("the record carries token URL %q, want %q", rec.TokenURL, first.TokenURL())
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("with its own token URL: %d %s", status, body)
	}
	stored, err := os.ReadFile(sc.recordPath("1234567"))
	if err != nil {
		t.Fatal(err)
	}

	sc.tokenURL = second.TokenURL()
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	advance(first, 2*time.Hour) // the stored access token is dead: a request would refresh
	second.Advance(2 * time.Hour)
	for i := 0; i < 5; i++ {
		status, body, resp := sc.get("/3/companyinformation", "1234567")
		e := errorAnswer(t, resp, body)
		if status != http.StatusServiceUnavailable || e.Error != "token_storage_unavailable" {
			t.Fatalf("a record of another token URL: %d %s", status, body)
		}
		if !strings.Contains(e.Message, "another token endpoint") {
			t.Errorf("the message does not say why: %s", e.Message)
		}
		for _, u := range []string{first.TokenURL(), second.TokenURL(), "127.0.0.1", "oauth-v1"} {
			if strings.Contains(string(body), u) {
				t.Errorf("the app's answer names %s: %s", u, body)
			}
		}
		advance(first, 2*time.Minute) // past the tenant's backoff: each request reads the record again
	}
	if n := second.TokenRequests("refresh_token", ""); n != 0 {
		t.Errorf("the new token endpoint received %d refresh-token grants, want 0", n)
	}
	if now, _ := os.ReadFile(sc.recordPath("1234567")); !bytes.Equal(now, stored) {
		t.Errorf("the record was changed:\n%s\nwas\n%s", now, stored)
	}
	lines := sc.logLinesWhere(func(string) bool { return true })
	var named []map[string]any
	for _, l := range lines {
		if l["record_token_url"] != nil && l["level"] != "debug" {
			named = append(named, l)
		}
	}
	if len(named) != 1 || named[0]["record_token_url"] != first.TokenURL() || named[0]["token_url"] != second.TokenURL() || named[0]["tenant"] != "1234567" {
		t.Errorf("want one log line naming both token URLs and the tenant, got %v", named)
	}
	if st, b := sc.admin(http.MethodPut, "/fortnox/tenants/1234567/refresh_token", `{"refresh_token":"`+second.IssueRefreshToken(testClientID, "1234567")+`"}`); st != http.StatusConflict || !strings.Contains(b, "record_unreadable") || !strings.Contains(b, "another token endpoint") {
		t.Errorf("PUT over a record of another token URL: %d %s", st, b)
	}
	if n := second.TokenRequests("refresh_token", ""); n != 0 {
		t.Errorf("the refused PUT spent a refresh token at the new endpoint (%d requests)", n)
	}
	if now, _ := os.ReadFile(sc.recordPath("1234567")); !bytes.Equal(now, stored) {
		t.Error("the admin PUT overwrote the record of another token URL")
	}

	sc.tokenURL = first.TokenURL()
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("with its own token URL back: %d %s", status, body)
	}
}

// A record written before records carried their token URL is used with the
// configured one, and stamped with it on its next write.
func TestUnstampedRecordIsStampedOnNextWrite(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	writeRecord(t, sc, "1234567", tokens.Record{Tenant: "1234567", ClientID: testClientID, Mode: tokens.GrantRefreshToken,
		RefreshToken: fake.IssueRefreshToken(testClientID, "1234567"), UpdatedAt: clk.Now().UTC()})
	if rec := sc.storedRecord("1234567"); rec.TokenURL != "" {
		t.Fatalf("the old record carries %q", rec.TokenURL)
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("an old record: %d %s", status, body)
	}
	if n := fake.TokenRequests("refresh_token", "1234567"); n != 1 {
		t.Errorf("%d refresh-token grants, want 1", n)
	}
	if rec := sc.storedRecord("1234567"); rec.TokenURL != fake.TokenURL() {
		t.Errorf("after its next write the record carries %q, want %q", rec.TokenURL, fake.TokenURL())
	}
}

// With encryption_key set, a record found unencrypted is never served:
// 503 token_storage_unavailable, one log line, the metric. `caddy fortnox
// encrypt` rewrites it encrypted in place; the tenant is served again, and
// a second run changes nothing.
func TestUnencryptedRecordIsRefusedUntilEncrypted(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	sc.putAccountToken("1234567", "anna", fake.IssueUserRefreshToken(testClientID, "1234567", annaUser))
	if raw, _ := os.ReadFile(sc.recordPath("1234567")); strings.Contains(string(raw), tokens.EncryptionAlgorithm) {
		t.Fatal("without a key the record is encrypted")
	}
	t.Setenv("FORTNOX_TEST_KEY", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
	sc.options = "encryption_key {env.FORTNOX_TEST_KEY}"
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	advance(fake, 2*time.Hour)
	spent := fake.TokenRequests("refresh_token", "") // the hand-overs
	before := scrape(t, sc)["caddy_fortnox_unencrypted_records_total"]
	for i := 0; i < 3; i++ {
		status, body, resp := sc.get("/3/companyinformation", "1234567")
		e := errorAnswer(t, resp, body)
		if status != http.StatusServiceUnavailable || e.Error != "token_storage_unavailable" || !strings.Contains(e.Message, "not encrypted") {
			t.Fatalf("an unencrypted record with encryption_key set: %d %s", status, body)
		}
		if strings.Contains(e.Message, sc.dir) || strings.Contains(e.Message, "fortnox/") {
			t.Errorf("the app's answer names a path or key: %s", e.Message)
		}
		advance(fake, 2*time.Minute) // past the backoff: the record is read again
	}
	if got := scrape(t, sc)["caddy_fortnox_unencrypted_records_total"] - before; got < 3 {
		t.Errorf("caddy_fortnox_unencrypted_records_total grew by %v, want at least 3 (one per refused request)", got)
	}
	var lines []map[string]any
	for _, l := range sc.logLines("token request failed") {
		if s, _ := l["error"].(string); strings.Contains(s, "is not encrypted, but encryption_key is set") && l["tenant"] == "1234567" {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 {
		t.Errorf("%d log lines for the unencrypted record, want 1", len(lines))
	}
	if fake.TokenRequests("refresh_token", "") != spent {
		t.Error("a refresh token of an unencrypted record was spent")
	}

	run := func() string {
		t.Helper()
		var out strings.Builder
		c := transferCommand("encrypt")
		c.SetOut(&out)
		c.SetArgs([]string{"--address", strings.TrimPrefix(sc.adminURL, "http://")})
		if err := c.Execute(); err != nil {
			t.Fatalf("caddy fortnox encrypt: %v: %s", err, out.String())
		}
		return out.String()
	}
	if out := run(); !strings.Contains(out, "encrypt: 2 records encrypted, 0 already encrypted, 0 failed") || !strings.Contains(out, "accounts/1234567/anna.json") {
		t.Fatalf("caddy fortnox encrypt: %s", out)
	}
	encrypted := map[string][]byte{}
	for _, path := range []string{sc.recordPath("1234567"), sc.accountRecordPath("1234567", "anna")} {
		raw, _ := os.ReadFile(path)
		var probe tokens.EncryptedRecord
		if json.Unmarshal(raw, &probe) != nil || probe.Encrypted != tokens.EncryptionAlgorithm || strings.Contains(string(raw), "refresh_token") {
			t.Errorf("%s is not encrypted: %s", path, raw)
		}
		encrypted[path] = raw
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("after caddy fortnox encrypt: %d %s", status, body)
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/companyinformation", "1234567", "anna"); status != http.StatusOK {
		t.Fatalf("the account after caddy fortnox encrypt: %d %s", status, body)
	}

	// The refreshes above rewrote both records (encrypted, with the new
	// refresh tokens); a second run leaves them byte for byte.
	for path := range encrypted {
		encrypted[path], _ = os.ReadFile(path)
	}
	if out := run(); !strings.Contains(out, "encrypt: 0 records encrypted, 2 already encrypted, 0 failed") {
		t.Errorf("a second run: %s", out)
	}
	for path, was := range encrypted {
		if raw, _ := os.ReadFile(path); !bytes.Equal(raw, was) {
			t.Errorf("a second run rewrote %s", path)
		}
	}
}

// Without encryption_key there is nothing to encrypt with: the admin route
// says so and changes nothing.
func TestEncryptWithoutKeyIsRefused(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	stored, _ := os.ReadFile(sc.recordPath("1234567"))
	if st, b := sc.admin(http.MethodPost, "/fortnox/encrypt", ""); st != http.StatusBadRequest || !strings.Contains(b, "no_encryption_key") {
		t.Errorf("POST /fortnox/encrypt without a key: %d %s", st, b)
	}
	if st, _ := sc.admin(http.MethodGet, "/fortnox/encrypt", ""); st != http.StatusMethodNotAllowed {
		t.Errorf("GET /fortnox/encrypt: %d, want 405", st)
	}
	if raw, _ := os.ReadFile(sc.recordPath("1234567")); !bytes.Equal(raw, stored) {
		t.Error("the record changed")
	}
}

// A plain record copied to another tenant's key is not encrypted (that
// would make it look like the tenant's own): the run reports it as failed,
// encrypts the rest, and the copy stays refused.
func TestEncryptLeavesCopiedRecordAlone(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	original, _ := os.ReadFile(sc.recordPath("1234567"))
	if err := os.WriteFile(sc.recordPath("7654321"), original, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("FORTNOX_TEST_KEY", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
	sc.options = "encryption_key {env.FORTNOX_TEST_KEY}"
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	sc.get("/3/companyinformation", "1234567") // the first request installs the new settings
	st, b := sc.admin(http.MethodPost, "/fortnox/encrypt", "")
	var res tokens.EncryptResult
	if st != http.StatusOK || json.Unmarshal([]byte(b), &res) != nil || len(res.Encrypted) != 1 || len(res.Failed) != 1 ||
		!strings.Contains(res.Failed[0], "7654321.json") || !strings.Contains(res.Failed[0], "belongs elsewhere") {
		t.Fatalf("POST /fortnox/encrypt with a copied record: %d %s", st, b)
	}
	if raw, _ := os.ReadFile(sc.recordPath("7654321")); !bytes.Equal(raw, original) {
		t.Error("the copied record was changed")
	}
	if raw, _ := os.ReadFile(sc.recordPath("1234567")); !strings.Contains(string(raw), tokens.EncryptionAlgorithm) {
		t.Error("the tenant's own record was not encrypted")
	}
	status, body, _ := sc.get("/3/companyinformation", "7654321")
	if status == http.StatusOK {
		t.Errorf("the copied record served: %s", body)
	}
}

// In cluster mode the unencrypted records are in Redis: refused the same
// way, and encrypted in place there by POST /fortnox/encrypt.
func TestUnencryptedRedisRecordIsRefusedUntilEncrypted(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	t.Setenv("FORTNOX_TEST_REDIS_URL", "redis://"+addr+"/0")
	t.Setenv("FORTNOX_TEST_KEY", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
	client := redis.NewClient(&redis.Options{Addr: addr})
	t.Cleanup(func() { client.Close() })
	// The sidecar before its key was set: the record goes to Redis in
	// plain JSON.
	sc := startSidecar(t, fake, "redis {env.FORTNOX_TEST_REDIS_URL}")
	sc.putRefreshToken("1234567", fake.IssueRefreshToken(testClientID, "1234567"))
	valueKey := redisstate.RecordKey(tokens.RecordKey(testClientID, tokens.Subject{Tenant: "1234567"}))
	plain := client.Get(context.Background(), valueKey).Val()
	if !strings.Contains(plain, `"refresh_token"`) {
		t.Fatalf("no plain record in Redis: %q", plain)
	}
	sc.options = "redis {env.FORTNOX_TEST_REDIS_URL}\nencryption_key {env.FORTNOX_TEST_KEY}"
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	advance(fake, 2*time.Hour)
	sc.manager().Cache.Flush()
	status, body, resp := sc.get("/3/companyinformation", "1234567")
	if e := errorAnswer(t, resp, body); status != http.StatusServiceUnavailable || e.Error != "token_storage_unavailable" || !strings.Contains(e.Message, "not encrypted") {
		t.Fatalf("an unencrypted Redis record with encryption_key set: %d %s", status, body)
	}

	st, b := sc.admin(http.MethodPost, "/fortnox/encrypt", "")
	var res tokens.EncryptResult
	if st != http.StatusOK || json.Unmarshal([]byte(b), &res) != nil || len(res.Encrypted) != 1 || res.AlreadyEncrypted != 0 || len(res.Failed) != 0 {
		t.Fatalf("POST /fortnox/encrypt: %d %s", st, b)
	}
	if strings.Contains(b, "refresh_token\"") || regexp.MustCompile(`[0-9a-f]{40}`).MatchString(b) {
		t.Errorf("the answer may hold a token: %s", b)
	}
	sealed := client.Get(context.Background(), valueKey).Val()
	if !strings.Contains(sealed, tokens.EncryptionAlgorithm) || strings.Contains(sealed, "refresh_token") {
		t.Fatalf("the Redis record is not encrypted: %q", sealed)
	}
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("after POST /fortnox/encrypt: %d %s", status, body)
	}
	st, b = sc.admin(http.MethodPost, "/fortnox/encrypt", "")
	if st != http.StatusOK || json.Unmarshal([]byte(b), &res) != nil || len(res.Encrypted) != 0 || res.AlreadyEncrypted != 1 {
		t.Errorf("a second POST /fortnox/encrypt: %d %s", st, b)
	}
}

// 1,000 made-up account names, and 1,000 made-up tenants, write one log
// line per cause within the minute, never a made-up value; the next line
// of the cause, after the minute, carries the count of those left out; the
// metric counts every refusal.
func TestMadeUpNamesDoNotFloodTheLog(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "")
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("warm-up: %d %s", status, body)
	}
	before := scrape(t, sc)
	const n = 1000
	for i := 0; i < n; i++ {
		status, body, _ := sc.asAccount(http.MethodGet, "/3/companyinformation", "1234567", fmt.Sprintf("ghost-%d", i))
		if status != http.StatusForbidden {
			t.Fatalf("made-up account %d: %d %s", i, status, body)
		}
	}
	for i := 0; i < n; i++ {
		status, body, _ := sc.get("/3/companyinformation", fmt.Sprintf("555555%05d", i))
		if status != http.StatusForbidden {
			t.Fatalf("made-up tenant %d: %d %s", i, status, body)
		}
	}
	after := scrape(t, sc)
	for _, kind := range []string{"account_not_authorized", "tenant_not_authorized"} {
		sample := `caddy_fortnox_refusals_total{kind="` + kind + `"}`
		if got := after[sample] - before[sample]; got != n {
			t.Errorf("%s grew by %v, want %d", sample, got, n)
		}
	}

	accountLines := func() []map[string]any {
		var out []map[string]any
		for _, l := range sc.logLines("no token for tenant") {
			if l["outcome"] == "account_not_authorized" {
				out = append(out, l)
			}
		}
		return out
	}
	tenantLines := func() []map[string]any {
		var out []map[string]any
		for _, l := range sc.logLines("no token for tenant") {
			if l["outcome"] == "tenant_not_authorized" {
				out = append(out, l)
			}
		}
		return out
	}
	if got := accountLines(); len(got) != 1 || got[0]["tenant"] != "1234567" || got[0]["account"] != nil {
		t.Errorf("made-up accounts: want one line naming the tenant and no account, got %v", got)
	}
	if got := tenantLines(); len(got) != 1 || got[0]["tenant"] != nil {
		t.Errorf("made-up tenants: want one line naming no tenant, got %v", got)
	}
	madeUp := regexp.MustCompile(`ghost-|555555[0-9]{5}`)
	raw, err := os.ReadFile(sc.logPath())
	if err != nil {
		t.Fatal(err)
	}
	if m := madeUp.Find(raw); m != nil {
		t.Errorf("a made-up value (%s) is in the log", m)
	}

	// A tenant the config lists is known, so its line names it.
	sc.options = "tenant 7654321"
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	if status, body, _ := sc.get("/3/companyinformation", "7654321"); status != http.StatusForbidden {
		t.Fatalf("a listed tenant without consent: %d %s", status, body)
	}
	if got := tenantLines(); len(got) != 2 || got[1]["tenant"] != "7654321" {
		t.Errorf("a listed tenant: want a line naming it, got %v", got)
	}

	advance(fake, time.Minute+time.Second)
	sc.asAccount(http.MethodGet, "/3/companyinformation", "1234567", "ghost-after")
	sc.get("/3/companyinformation", "55555599999")
	if got := accountLines(); len(got) != 2 || got[1]["suppressed"] != float64(n-1) {
		t.Errorf("after the minute: want a second account line with suppressed %d, got %v", n-1, got)
	}
	if got := tenantLines(); len(got) != 3 || got[2]["suppressed"] != float64(n-1) || got[2]["tenant"] != nil {
		t.Errorf("after the minute: want a third tenant line, naming no tenant, with suppressed %d, got %v", n-1, got)
	}
}

// A burst that stops is still counted in the log: the sweeper writes the
// count of the lines left out once their minute has passed. The limiter's
// memory is bounded however many causes arrive.
func TestLogLimiterFlushAndBound(t *testing.T) {
	core, logs := observedLogger()
	l := tokens.NewLogLimiter(clk)
	for i := 0; i < 10; i++ {
		l.Write(core, zapcore.WarnLevel, "kind\x00", "refused")
	}
	l.Flush(core)
	if got := logs(); len(got) != 1 {
		t.Fatalf("%d lines before the minute passed, want 1", len(got))
	}
	clk.Advance(time.Minute)
	l.Flush(core)
	got := logs()
	if len(got) != 2 || got[1]["suppressed"] != int64(9) {
		t.Fatalf("the flush after the minute: %v", got)
	}
	for i := 0; i < 5*tokens.MaxLogCauses; i++ {
		l.Write(core, zapcore.WarnLevel, fmt.Sprintf("kind\x00%d", i), "refused")
	}
	l.Mu.Lock()
	size := len(l.Causes)
	l.Mu.Unlock()
	if size > tokens.MaxLogCauses+1 {
		t.Errorf("the limiter remembers %d causes, want at most %d", size, tokens.MaxLogCauses+1)
	}
}

// observedLogger is a logger whose lines the test reads back.
func observedLogger() (*zap.Logger, func() []map[string]any) {
	core, obs := observer.New(zapcore.DebugLevel)
	return zap.New(core), func() []map[string]any {
		var out []map[string]any
		for _, e := range obs.All() {
			out = append(out, e.ContextMap())
		}
		return out
	}
}
