package tokens

import (
	"context"
	"crypto/cipher"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// flakyStorage is a store shared by the managers of one test (as Redis is
// by sidecars) that fails on demand: down makes every call fail;
// downAfter > 0 lets that many more record writes through, then goes down.
type flakyStorage struct {
	mu        sync.Mutex
	data      map[string][]byte
	locks     map[string]bool
	down      atomic.Bool
	downAfter atomic.Int32
}

func newFlakyStorage() *flakyStorage {
	return &flakyStorage{data: map[string][]byte{}, locks: map[string]bool{}}
}

var errStoreDown = errors.New("the store is down (test)")

func (f *flakyStorage) Store(_ context.Context, key string, value []byte) error {
	if f.down.Load() {
		return errStoreDown
	}
	if n := f.downAfter.Load(); n > 0 && f.downAfter.Add(-1) == 0 {
		f.down.Store(true)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.data[key] = append([]byte(nil), value...)
	return nil
}

func (f *flakyStorage) Load(_ context.Context, key string) ([]byte, error) {
	if f.down.Load() {
		return nil, errStoreDown
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.data[key]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return append([]byte(nil), v...), nil
}

func (f *flakyStorage) Delete(_ context.Context, key string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.data, key)
	return nil
}

func (f *flakyStorage) List(context.Context, string, bool) ([]string, error) {
	return nil, nil
}

func (f *flakyStorage) Lock(ctx context.Context, name string) error {
	for {
		if f.down.Load() {
			return errStoreDown
		}
		f.mu.Lock()
		if !f.locks[name] {
			f.locks[name] = true
			f.mu.Unlock()
			return nil
		}
		f.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (f *flakyStorage) Unlock(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.locks, name)
	return nil
}

const (
	jClient = "journal-client"
	jSecret = "journal-secret"
	jTenant = "1234567"
)

// journalRig is a fake Fortnox, one shared store and a journal directory.
type journalRig struct {
	t     *testing.T
	fake  *fakefortnox.Server
	store *flakyStorage
	dir   string
	clk   *clock.Clock
	keys  []cipher.AEAD
	logs  *observer.ObservedLogs
	log   *zap.Logger
}

func newJournalRig(t *testing.T, encrypted bool) *journalRig {
	t.Helper()
	fake, err := fakefortnox.Start(fakefortnox.Options{Clients: map[string]string{jClient: jSecret}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fake.Close)
	core, logs := observer.New(zap.DebugLevel)
	r := &journalRig{t: t, fake: fake, store: newFlakyStorage(), dir: filepath.Join(t.TempDir(), "journal"),
		clk: clock.New(), logs: logs, log: zap.New(core)}
	if encrypted {
		key, err := ParseEncryptionKey(strings.Repeat("ab", 32))
		if err != nil {
			t.Fatal(err)
		}
		r.keys = []cipher.AEAD{key}
	}
	return r
}

// records is the rig's record store, as a manager sees it.
func (r *journalRig) records() *Records {
	return &Records{Storage: r.store, ClientID: jClient, Clock: r.clk, Keys: r.keys}
}

// manager is one sidecar's manager on the rig's store and journal.
func (r *journalRig) manager() *Manager {
	m := NewManager(r.fake.TokenURL(), jClient, r.clk)
	m.Settings.Store(&Settings{Gen: 1, Cred: Credentials{ClientID: jClient, ClientSecret: jSecret},
		RefreshBefore: DefaultRefreshBefore, TokenTimeout: 5 * time.Second, RetryClientCredentials: time.Hour,
		Records: r.records(), Logger: r.log, JournalDir: r.dir})
	r.t.Cleanup(func() { _ = m.Destruct() })
	return m
}

// seed stores a record holding a refresh token the fake issued.
func (r *journalRig) seed() string {
	rt := r.fake.IssueRefreshToken(jClient, jTenant)
	if err := r.records().save(context.Background(), Subject{Tenant: jTenant}, &Record{Mode: GrantRefreshToken, RefreshToken: rt}); err != nil {
		r.t.Fatal(err)
	}
	return rt
}

// stored reads the tenant's record straight from the store.
func (r *journalRig) stored() *Record {
	r.t.Helper()
	r.store.mu.Lock()
	raw := r.store.data[RecordKey(jClient, Subject{Tenant: jTenant})]
	r.store.mu.Unlock()
	rec, err := r.records().Decode(RecordKey(jClient, Subject{Tenant: jTenant}), raw)
	if err != nil {
		r.t.Fatalf("reading the stored record: %v", err)
	}
	return rec
}

// entries lists the journal's entries.
func (r *journalRig) entries() []string {
	names, _ := filepath.Glob(filepath.Join(r.dir, "*"+JournalFileSuffix))
	return names
}

// waitStored waits until the store holds a live refresh token with no
// mark and the journal is empty; it returns how long that took.
func (r *journalRig) waitStored(within time.Duration) time.Duration {
	r.t.Helper()
	start := time.Now()
	for {
		rec := r.stored()
		if r.fake.RefreshTokenValid(rec.RefreshToken) && rec.RotatingBy == "" && len(r.entries()) == 0 {
			return time.Since(start)
		}
		if time.Since(start) > within {
			r.t.Fatalf("the rotated refresh token did not reach the store within %s (stored valid: %v, mark %q, entries %d)",
				within, r.fake.RefreshTokenValid(rec.RefreshToken), rec.RotatingBy, len(r.entries()))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// rotateWithStoreDown has m refresh the subject while the store goes down
// after one more record write: the mark is written, the rotated record is
// not (it stays in the journal).
func (r *journalRig) rotateWithStoreDown(m *Manager) {
	r.t.Helper()
	r.store.downAfter.Store(1)
	if _, err := m.TokenFor(context.Background(), jSubj); err != nil {
		r.t.Fatalf("TokenFor: %v", err)
	}
}

// shortRetry makes the journal's background retry run every 50ms.
func shortRetry(t *testing.T, every time.Duration) {
	old := JournalRetryInterval
	JournalRetryInterval = every
	t.Cleanup(func() { JournalRetryInterval = old })
}

var jSubj = Subject{Tenant: jTenant}

// The rotated record is in the journal, sealed with the key and synced,
// when the token is returned, while the store refuses it; the background
// retry writes it to the store once the store works again, and deletes
// the entry.
func TestJournalHoldsRotatedTokenUntilTheStoreTakesIt(t *testing.T) {
	shortRetry(t, 50*time.Millisecond)
	r := newJournalRig(t, true)
	spent := r.seed()
	m := r.manager()
	r.store.downAfter.Store(1) // the mark is written; the rotated record is not

	tok, err := m.TokenFor(context.Background(), jSubj)
	if err != nil {
		t.Fatalf("TokenFor: %v", err)
	}
	if r.fake.RefreshTokenValid(spent) {
		t.Fatal("the fake did not rotate the refresh token")
	}
	entries := r.entries()
	if len(entries) != 1 {
		t.Fatalf("journal entries when the token was returned: %d, want 1", len(entries))
	}
	raw, err := os.ReadFile(entries[0])
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), EncryptionAlgorithm) || strings.Contains(string(raw), tok.accessToken()) || strings.Contains(string(raw), "refresh_token") {
		t.Fatalf("the journal entry is not sealed: %.80s…", raw)
	}
	e, err := m.journal.read(m.Settings.Load(), entries[0])
	if err != nil || e == nil || !r.fake.RefreshTokenValid(e.Record.RefreshToken) || e.Spent != tokenHash(spent) {
		t.Fatalf("the journal entry does not hold the rotated refresh token: %+v, %v", e, err)
	}
	if fi, err := os.Stat(entries[0]); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("entry mode: %v, %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(r.dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("journal dir mode: %v, %v", fi.Mode(), err)
	}
	time.Sleep(200 * time.Millisecond) // a few retries against a store that is down
	if len(r.entries()) != 1 {
		t.Fatal("the entry went away while the store was down")
	}

	r.store.down.Store(false)
	took := r.waitStored(5 * time.Second)
	t.Logf("stored %s after the store came back", took)
	if r.fake.SpentRefreshTokenReuses() != 0 {
		t.Fatalf("a spent refresh token was presented again")
	}
}

// A manager started on the journal a stopped one left (a killed process)
// writes it to the store at start.
func TestJournalLeftByAStoppedProcessIsFlushedAtStart(t *testing.T) {
	shortRetry(t, 50*time.Millisecond)
	r := newJournalRig(t, false)
	r.seed()
	a := r.manager()
	r.rotateWithStoreDown(a)
	a.cancel() // killed: its loops stop, nothing is flushed
	time.Sleep(100 * time.Millisecond)
	if len(r.entries()) != 1 {
		t.Fatalf("journal entries after the kill: %d, want 1", len(r.entries()))
	}
	r.store.down.Store(false)
	time.Sleep(200 * time.Millisecond)
	if len(r.entries()) != 1 {
		t.Fatal("a killed manager flushed its journal")
	}
	start := time.Now()
	r.manager()
	r.waitStored(5 * time.Second)
	t.Logf("the new manager stored the journal %s after it started", time.Since(start))
}

// Destruct (a shutdown) writes what the journal holds within its bound,
// without waiting for the background retry.
func TestDestructFlushesTheJournal(t *testing.T) {
	shortRetry(t, time.Hour)
	r := newJournalRig(t, true)
	r.seed()
	m := r.manager()
	r.rotateWithStoreDown(m)
	r.store.down.Store(false)
	if len(r.entries()) != 1 {
		t.Fatalf("journal entries: %d, want 1", len(r.entries()))
	}
	start := time.Now()
	_ = m.Destruct()
	if took := time.Since(start); took > journalShutdownBound {
		t.Fatalf("Destruct took %s", took)
	}
	r.waitStored(0)
}

// An entry whose store record moved on (a new refresh token handed over
// after the rotation) is dropped with a warning, never written over it.
func TestJournalNeverOverwritesARecordThatMovedOn(t *testing.T) {
	shortRetry(t, 50*time.Millisecond)
	r := newJournalRig(t, false)
	r.seed()
	m := r.manager()
	r.rotateWithStoreDown(m)
	// An operator hands a new refresh token over meanwhile.
	handed := r.fake.IssueRefreshToken(jClient, jTenant)
	r.store.down.Store(false)
	r.store.downAfter.Store(0)
	r.store.down.Store(true)
	raw, err := r.records().Encode(RecordKey(jClient, jSubj), &Record{Tenant: jTenant, ClientID: jClient, Mode: GrantRefreshToken, RefreshToken: handed})
	if err != nil {
		t.Fatal(err)
	}
	r.store.mu.Lock()
	r.store.data[RecordKey(jClient, jSubj)] = raw
	r.store.mu.Unlock()
	r.store.down.Store(false)

	deadline := time.Now().Add(5 * time.Second)
	for (len(r.entries()) > 0 || r.logs.FilterMessageSnippet("moved on").Len() == 0) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if len(r.entries()) != 0 {
		t.Fatal("the entry was not dropped")
	}
	if got := r.stored().RefreshToken; got != handed {
		t.Fatal("the journal overwrote the handed-over refresh token")
	}
	if r.logs.FilterMessageSnippet("moved on").Len() != 1 {
		t.Fatalf("no warning about the dropped entry: %v", r.logs.All())
	}
	for _, e := range r.logs.All() {
		if strings.Contains(e.Message+fmt.Sprint(e.ContextMap()), handed) {
			t.Fatal("a refresh token reached the log")
		}
	}
}

// While one manager's rotation is in flight (its mark in the record),
// another manager on the same store answers refresh_in_progress (503),
// at once, and never presents the refresh token; once the rotated record
// lands it uses the new token.
func TestInFlightMarkAnswersRefreshInProgress(t *testing.T) {
	r := newJournalRig(t, false)
	// A named account: its token comes from its refresh-token chain only
	// (no client-credentials request, which the fault would delay too).
	anna := Subject{Tenant: jTenant, Account: "anna"}
	rt := r.fake.IssueUserRefreshToken(jClient, jTenant, "7")
	if err := r.records().save(context.Background(), anna, &Record{Mode: GrantRefreshToken, RefreshToken: rt}); err != nil {
		t.Fatal(err)
	}
	r.fake.SetRevokeChainOnReuse(true)
	r.fake.SetFault(fakefortnox.Fault{AnswerDelay: 1500 * time.Millisecond})
	a, b := r.manager(), r.manager()

	done := make(chan error, 1)
	go func() {
		_, err := a.TokenFor(context.Background(), anna)
		done <- err
	}()
	for r.fake.TokenRequests("refresh_token", "") == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	_, err := b.TokenFor(context.Background(), anna)
	var terr *Error
	if !errors.As(err, &terr) || terr.ErrorCode() != "refresh_in_progress" || terr.HttpStatus() != 503 || terr.RetryAt.IsZero() {
		t.Fatalf("the other manager answered %v, want 503 refresh_in_progress", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("the answer took %s: it waited for the holder", took)
	}
	if err := <-done; err != nil {
		t.Fatalf("the holder: %v", err)
	}
	r.fake.ClearFault()
	if _, err := b.TokenFor(context.Background(), anna); err != nil {
		t.Fatalf("after the rotation landed: %v", err)
	}
	if n := r.fake.TokenRequests("refresh_token", ""); n != 1 || r.fake.SpentRefreshTokenReuses() != 0 {
		t.Fatalf("refresh requests %d, spent reuses %d; want 1 and 0", n, r.fake.SpentRefreshTokenReuses())
	}
	if rec, err := r.records().load(context.Background(), anna); err != nil || rec.RotatingBy != "" || !r.fake.RefreshTokenValid(rec.RefreshToken) {
		t.Fatalf("the rotated record with no mark is not in the store: %v", err)
	}
}

// A mark whose holder stopped renewing it is honoured until
// rotation_timeout; after it, exactly one of the managers that need the
// token tries the last stored refresh token, and the others answer
// refresh_in_progress meanwhile.
func TestStaleMarkLetsExactlyOneTry(t *testing.T) {
	r := newJournalRig(t, false)
	rt := r.seed()
	rec := r.stored()
	n := r.clk.Now().UTC()
	rec.RotatingBy, rec.RotatingSince, rec.RotatingRenewed = "dead-holder", n, n
	if err := r.records().save(context.Background(), jSubj, rec); err != nil {
		t.Fatal(err)
	}
	r.fake.SetFault(fakefortnox.Fault{AnswerDelay: 300 * time.Millisecond})
	ms := []*Manager{r.manager(), r.manager(), r.manager()}
	for _, m := range ms {
		m.Settings.Load().RotationTimeout = time.Minute
	}
	r.clk.Advance(59 * time.Second)
	for _, m := range ms {
		if _, err := m.TokenFor(context.Background(), jSubj); err == nil || !strings.Contains(err.Error(), "being rotated") {
			t.Fatalf("before rotation_timeout: %v, want refresh_in_progress", err)
		}
	}
	r.clk.Advance(2 * time.Second)
	var wg sync.WaitGroup
	var ok atomic.Int32
	for _, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := m.TokenFor(context.Background(), jSubj); err == nil {
				ok.Add(1)
			} else if !strings.Contains(err.Error(), "being rotated") {
				t.Errorf("after rotation_timeout: %v", err)
			}
		}()
	}
	wg.Wait()
	if n := r.fake.RefreshTokenUses(rt); n != 1 {
		t.Fatalf("the stored refresh token was presented %d times, want 1", n)
	}
	if ok.Load() < 1 {
		t.Fatal("no manager got the token")
	}
	if rec := r.stored(); !r.fake.RefreshTokenValid(rec.RefreshToken) || rec.RotatingBy != "" {
		t.Fatal("the rotated record is not in the store")
	}
}

// A lock left behind by the rotation that wrote an entry (its holder could
// not release it while the store was down) does not hold the entry up
// while the record still carries that rotation's mark; a lock held by
// another writer, on a record without the entry's mark, does.
func TestJournalFlushAndALockLeftBehind(t *testing.T) {
	shortRetry(t, 50*time.Millisecond)
	r := newJournalRig(t, false)
	r.seed()
	m := r.manager()
	r.rotateWithStoreDown(m)
	lock := LockName(jClient, jSubj)
	r.store.mu.Lock()
	r.store.locks[lock] = true // the holder's lock, never released
	r.store.mu.Unlock()
	r.store.down.Store(false)
	r.waitStored(5 * time.Second)

	// Again, but the record lost the mark meanwhile (another writer holds
	// the lock): the entry waits for the lock.
	r.store.mu.Lock()
	delete(r.store.locks, lock)
	r.store.mu.Unlock()
	m.Cache.Flush()
	r.clk.Advance(time.Hour) // the stored access token is due
	r.rotateWithStoreDown(m)
	// While the store is down: the mark goes (another writer), and the
	// other writer holds the lock. Then the store answers again.
	rec := r.records()
	key := RecordKey(jClient, jSubj)
	r.store.mu.Lock()
	stored, err := rec.Decode(key, r.store.data[key])
	if err != nil || stored.RotatingBy == "" {
		r.store.mu.Unlock()
		t.Fatalf("the marked record: %+v, %v", stored, err)
	}
	stored.clearMark()
	r.store.data[key], _ = rec.Encode(key, stored)
	r.store.locks[lock] = true
	r.store.mu.Unlock()
	r.store.down.Store(false)
	time.Sleep(2*flushLockWait + 200*time.Millisecond) // a try or two
	if len(r.entries()) != 1 {
		t.Fatal("the entry was written past another writer's lock")
	}
	r.store.mu.Lock()
	delete(r.store.locks, lock)
	r.store.mu.Unlock()
	r.waitStored(5 * time.Second)
}
