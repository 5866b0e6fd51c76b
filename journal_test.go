package fortnox

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// journal_dir and rotation_timeout adapt to their JSON twins; bad values
// are refused with a clear error, at adapt time or when the config loads.
func TestJournalOptionsAdaptAndCheck(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(`:8080 {
	fortnox {
		client_id id
		client_secret secret
		journal_dir `+dir+`
		rotation_timeout 2m
	}
}`), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapt: %v %v", err, warnings)
	}
	if !strings.Contains(string(adapted), `"journal_dir":"`+dir+`"`) || !strings.Contains(string(adapted), `"rotation_timeout":120000000000`) {
		t.Fatalf("adapted JSON lacks journal_dir or rotation_timeout: %s", adapted)
	}
	for _, tc := range []struct{ option, want string }{
		{"rotation_timeout soon", `rotation_timeout: "soon" is not a duration`},
		{"rotation_timeout 0s", "rotation_timeout must be positive"},
		{"journal_dir", "journal_dir needs a value"},
		{"journal_dir a b", "journal_dir takes exactly one value"},
	} {
		_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(":8080 {\n\tfortnox {\n\t\t"+tc.option+"\n\t}\n}"), map[string]any{"filename": "Caddyfile"})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.option, err, tc.want)
		}
	}

	// A journal_dir that is a file is refused when the config loads.
	file := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	sc.options = "journal_dir " + file
	if err := sc.load(); err == nil || !strings.Contains(err.Error(), "journal_dir") || !strings.Contains(err.Error(), "is a file, not a directory") {
		t.Fatalf("loading with journal_dir on a file: %v", err)
	}
	// The JSON twin is read as well.
	var h Handler
	if err := json.Unmarshal([]byte(`{"journal_dir":"/var/lib/fortnox-journal","rotation_timeout":60000000000}`), &h); err != nil ||
		h.JournalDir != "/var/lib/fortnox-journal" || time.Duration(h.RotationTimeout) != time.Minute {
		t.Fatalf("JSON: %+v %v", h, err)
	}
}

// One sidecar on Caddy's file storage: a storage write that fails just
// after Fortnox rotated the refresh token loses nothing. The request is
// served with the new access token, the rotated refresh token waits in
// journal_dir (sealed, no token in plain text), and the background retry
// writes it to the storage within 5 s of the storage working again.
func TestStorageFailureMidRotationKeepsTheTokenInTheJournal(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1, TokenLifetime: time.Minute})
	journalDir := filepath.Join(t.TempDir(), "journal")
	sc := startSidecar(t, fake, "journal_dir "+journalDir+"\nencryption_key "+strings.Repeat("cd", 32))
	rt := fake.IssueRefreshToken(testClientID, "1234567")
	sc.putRefreshToken("1234567", rt)
	recordPath := sc.recordPath("1234567")

	before := fake.TokenRequests("refresh_token", "1234567")
	advance(fake, 50*time.Second)                                  // the handed-over access token is due for refresh
	fake.SetFault(fakefortnox.Fault{AnswerDelay: 2 * time.Second}) // room to break the storage first, also on a loaded machine
	type answer struct {
		status int
		body   []byte
	}
	done := make(chan answer, 1)
	go func() {
		status, body, _ := sc.get("/3/companyinformation", "1234567")
		done <- answer{status, body}
	}()
	eventually(t, 5*time.Second, "the refresh request", func() bool { return fake.TokenRequests("refresh_token", "1234567") > before })
	// Fortnox has rotated the token; the storage breaks before the answer
	// arrives: a directory where the record is makes every write fail.
	marked, err := os.ReadFile(recordPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(recordPath); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(recordPath, "blocked"), 0o700); err != nil {
		t.Fatal(err)
	}
	a := <-done
	fake.ClearFault()
	if a.status != http.StatusOK || companyNumber(t, a.body) != "1234567" {
		t.Fatalf("the request during the storage failure: %d %s", a.status, a.body)
	}
	entries, _ := filepath.Glob(filepath.Join(journalDir, "*"+tokens.JournalFileSuffix))
	if len(entries) != 1 {
		t.Fatalf("journal entries: %d, want 1", len(entries))
	}
	raw, err := os.ReadFile(entries[0])
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), tokens.EncryptionAlgorithm) || strings.Contains(string(raw), "refresh_token") {
		t.Fatalf("the journal entry is not sealed: %.80s…", raw)
	}
	time.Sleep(1500 * time.Millisecond) // retries meet the broken storage
	if len(sc.logLinesStarting("the new refresh token could not be saved to the store: it is kept in the journal")) == 0 {
		t.Error("no log line says where the rotated token is")
	}

	// The storage works again (the marked record is back).
	if err := os.RemoveAll(recordPath); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(recordPath, marked, 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	eventually(t, 5*time.Second, "the rotated refresh token in the storage", func() bool {
		left, _ := filepath.Glob(filepath.Join(journalDir, "*"+tokens.JournalFileSuffix))
		return len(left) == 0
	})
	t.Logf("stored %s after the storage worked again", time.Since(start).Round(time.Millisecond))
	sc.manager().Cache.Flush()
	advance(fake, 50*time.Second) // the access token is due: the stored refresh token is spent next
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("after the storage came back: %d %s", status, body)
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 || fake.SpentRefreshTokenReuses() != 0 {
		t.Fatalf("invalid_grant answers %d, spent reuses %d", n, fake.SpentRefreshTokenReuses())
	}
	if fake.TokenRequests("refresh_token", "1234567") < 2 {
		t.Fatal("the chain was not used after the storage came back")
	}
}
