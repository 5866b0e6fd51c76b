package cluster

import (
	"context"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/logscan"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// redisDump returns every key the plugin wrote and its whole value
// (strings, hashes, lists, sets, sorted sets), as text.
func redisDump(t *testing.T, rc *redis.Client) map[string]string {
	t.Helper()
	ctx, cancel := redisContext()
	defer cancel()
	keys, err := rc.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, k := range keys {
		var v any
		switch typ := rc.Type(ctx, k).Val(); typ {
		case "string":
			v, err = rc.Get(ctx, k).Result()
		case "hash":
			v, err = rc.HGetAll(ctx, k).Result()
		case "list":
			v, err = rc.LRange(ctx, k, 0, -1).Result()
		case "set":
			v, err = rc.SMembers(ctx, k).Result()
		case "zset":
			v, err = rc.ZRangeWithScores(ctx, k, 0, -1).Result()
		case "none":
			continue // expired meanwhile
		default:
			t.Fatalf("Redis key %s has type %s, which the dump cannot read", k, typ)
		}
		if err != nil && err != redis.Nil {
			t.Fatal(err)
		}
		out[k] = fmt.Sprint(v)
	}
	return out
}

// knownSecrets are the tokens the fake handed out or saw, and the
// configured secrets.
func knownSecrets(fake *fakefortnox.Server) []string {
	seen := map[string]bool{clientSecret: true, webhookSecret: true, encryptionKey: true}
	for _, r := range fake.TokenRequestLog() {
		if r.RefreshToken != "" {
			seen[r.RefreshToken] = true
		}
	}
	for _, r := range fake.APIRequests() {
		if tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "); tok != "" {
			seen[tok] = true
		}
	}
	var out []string
	for s := range seen {
		out = append(out, s)
	}
	return out
}

// holdsSecret names what text holds: a JWT, a 40-hex refresh token or one
// of the secrets ("" when nothing).
func holdsSecret(text string, secrets []string) string {
	for _, p := range logscan.Patterns() {
		if p.MatchString(text) {
			return "a match of " + p.String()
		}
	}
	for _, s := range secrets {
		if strings.Contains(text, s) {
			return fmt.Sprintf("a token or secret the fake knows (%.6s…)", s)
		}
	}
	return ""
}

// With encryption_key set, nothing the cluster writes holds a plaintext
// token: not a Redis value (records, shared access tokens, the rate
// budget, locks, guards), not a message broadcast between the sidecars,
// not Redis's append-only file (every write ever made, also of keys
// deleted since), not the sidecars' own storage, not their logs (scanned
// by TestMain with test/logscan, with the others').
func TestNoPlaintextTokenInRedisOrLogs(t *testing.T) {
	t.Parallel()
	fake := startFake(t, 0)
	c := startCluster(t, fake, settings{maxWait: 10 * time.Second})
	rc := c.redisClient()

	// Every broadcast, as the sidecars send them.
	ps := rc.PSubscribe(context.Background(), "caddy-fortnox:*")
	defer ps.Close()
	var mu sync.Mutex
	var messages []string
	go func() {
		for m := range ps.Channel() {
			mu.Lock()
			messages = append(messages, m.Payload)
			mu.Unlock()
		}
	}()
	testproc.WaitFor(t, "the test's subscription", 5*time.Second, func() bool {
		ctx, cancel := redisContext()
		defer cancel()
		return rc.PubSubNumPat(ctx).Val() == 1
	})

	const (
		cc      = "1700001" // client credentials
		chain   = "1700002" // refresh token
		account = "anna.svensson"
	)
	fake.GrantConsent(clientID, cc)
	c.sidecars[0].putRefreshToken(chain, fake.IssueRefreshToken(clientID, chain))
	c.sidecars[1].putAccountRefreshToken(cc, account, fake.IssueUserRefreshToken(clientID, cc, "7"))
	for _, sc := range c.sidecars {
		sc.mustServe(cc)
		sc.mustServe(chain)
		if a := sc.getAs(cc, account); a.status != http.StatusOK {
			t.Fatalf("%s, account %s: %v", sc.name, account, a)
		}
	}
	// A 401 on a token older than 10 s drops it for every sidecar (an
	// invalidation broadcast), and a revocation and a new consent are
	// broadcast too.
	time.Sleep(11 * time.Second)
	fake.RevokeAccessTokens(clientID, cc)
	c.sidecars[2].mustServe(cc) // replayed with a new token
	c.sidecars[0].postConsentEvent("client_credentials_consent_revoked", cc)
	c.sidecars[1].postConsentEvent("client_credentials_consent", cc)
	untilAll(t, c, cc, time.Now(), 2*time.Second, func(a answer) bool { return a.status == http.StatusOK })
	testproc.WaitFor(t, "the broadcasts", 5*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(messages) >= 3
	})

	secrets := knownSecrets(fake)
	dump := redisDump(t, rc)
	for _, want := range []string{
		"caddy-fortnox:record:{fortnox/" + clientID + "/" + chain + "}:fortnox/" + clientID + "/" + chain + ".json",
		"caddy-fortnox:record:{fortnox/" + clientID + "/" + cc + "}:fortnox/" + clientID + "/accounts/" + cc + "/" + account + ".json",
		"caddy-fortnox:token:{fortnox/" + clientID + "/" + cc + "}:" + cc,
		"caddy-fortnox:turns:{fortnox/" + clientID + "/" + cc + "}",
	} {
		if _, ok := dump[want]; !ok {
			t.Errorf("Redis has no %s: the scan would prove nothing about it", want)
		}
	}
	encrypted := regexp.MustCompile(`"encrypted":"AES-256-GCM"`)
	for k, v := range dump {
		if what := holdsSecret(v, secrets); what != "" {
			t.Errorf("Redis key %s holds %s", k, what)
		}
		if strings.HasPrefix(k, "caddy-fortnox:record:") && !encrypted.MatchString(v) {
			t.Errorf("the record %s is not encrypted: %.80s", k, v)
		}
	}
	mu.Lock()
	for _, m := range messages {
		if what := holdsSecret(m, secrets); what != "" {
			t.Errorf("a broadcast holds %s: %.200s", what, m)
		}
	}
	t.Logf("scanned %d Redis keys and %d broadcasts against %d known tokens and secrets", len(dump), len(messages), len(secrets))
	mu.Unlock()

	// Redis's append-only file, and every file in each sidecar's storage.
	var files []string
	for _, dir := range []string{c.redis.Dir(), c.sidecars[0].storage, c.sidecars[1].storage, c.sidecars[2].storage} {
		_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				files = append(files, path)
			}
			return nil
		})
	}
	aof := 0
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(f, "appendonlydir") {
			aof += len(raw)
		}
		if what := holdsSecret(string(raw), secrets); what != "" {
			t.Errorf("%s holds %s", f, what)
		}
	}
	if aof == 0 {
		t.Error("Redis's append-only file is empty: the scan proved nothing")
	}
	t.Logf("scanned %d files (append-only file: %d bytes)", len(files), aof)
}
