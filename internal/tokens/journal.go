package tokens

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// The journal keeps every rotated refresh token on the sidecar's own disk
// (journal_dir) until the store has it: a rotated refresh token is never
// only in memory. An entry is written and synced (the file and its
// directory) right after Fortnox answers and before the new access token is
// used; it is deleted once the record is in the store. Entries the store
// has not taken are written there by a background retry, on a reconnect
// (Resync), when a manager starts on the same directory (a process that
// stopped, gracefully or not) and, within a bound, when it is destroyed.
//
// An entry never overwrites a record that moved on: it says which refresh
// token was spent (a hash), and is written only while the store still
// holds that one. Entries are sealed like records (encryption_key).

// Defaults of the journal and of the in-flight mark.
const (
	// DefaultRotationTimeout: a rotation in flight whose mark was not
	// renewed for this long has no live holder; the last stored refresh
	// token is then tried once.
	DefaultRotationTimeout = 10 * time.Minute
	// journalShutdownBound bounds the journal flush of a manager being
	// destroyed.
	journalShutdownBound = 5 * time.Second
	// journalWriteLimit bounds one store write of a journal flush.
	journalWriteLimit = 5 * time.Second
)

// JournalRetryInterval is how often the journal's entries are offered to
// the store again while any remain (tests shorten it).
var JournalRetryInterval = time.Second

// MarkRenewInterval is how often a holder renews its in-flight mark while
// its refresh-token request is pending (tests shorten it).
var MarkRenewInterval = 3 * time.Second

// JournalFileSuffix ends the name of every journal entry.
const JournalFileSuffix = ".journal"

// journalEntry is one rotated record the store has not taken yet.
type journalEntry struct {
	Tenant  string `json:"tenant"`
	Account string `json:"account,omitempty"`
	// Spent is the hash of the refresh token the rotation spent: the
	// entry is written only while the store still holds that one.
	Spent string `json:"spent"`
	// Holder is the in-flight mark's holder of the rotation.
	Holder    string    `json:"holder"`
	WrittenAt time.Time `json:"written_at"`
	Record    *Record   `json:"record"`
}

func (e *journalEntry) subject() Subject { return Subject{Tenant: e.Tenant, Account: e.Account} }

// tokenHash is what a journal entry keeps of a refresh token: never the
// token itself.
func tokenHash(token string) string {
	sum := sha256.Sum256([]byte("fortnox refresh token\x00" + token))
	return hex.EncodeToString(sum[:])
}

// journal is the manager's part that writes, flushes and deletes journal
// entries.
type journal struct {
	m *Manager
	// mu serializes flushes (the background retry, Resync, a token
	// request's own subject, Destruct).
	mu sync.Mutex
	// pending: entries may remain (or the directory was not read yet).
	pending atomic.Bool
	kick    chan struct{}
	every   time.Duration // JournalRetryInterval when the manager was made
}

func newJournal(m *Manager) *journal {
	j := &journal{m: m, kick: make(chan struct{}, 1), every: JournalRetryInterval}
	j.pending.Store(true) // read what a stopped process left, once settings are in
	return j
}

// dir is the journal directory of s ("" when none is configured: unit
// tests without one keep unsaved records in memory, as before).
func journalDir(s *Settings) string {
	if s == nil || s.Records == nil {
		return ""
	}
	return s.JournalDir
}

// prefix starts the names of this manager's entries: the journal
// directory may be shared by several client ids and token URLs.
func (j *journal) prefix(s *Settings) string {
	sum := sha256.Sum256([]byte(j.m.TokenURL + "\x00" + j.m.clientID))
	return hex.EncodeToString(sum[:8]) + "-"
}

// path is where subj's entry lives.
func (j *journal) path(s *Settings, subj Subject) string {
	sum := sha256.Sum256([]byte(RecordKey(j.m.clientID, subj)))
	return filepath.Join(journalDir(s), j.prefix(s)+hex.EncodeToString(sum[:16])+JournalFileSuffix)
}

// sealKey binds a sealed entry to the journal of its client id; the
// entry's own subject is checked against its file name when it is read.
func (j *journal) sealKey() string {
	return "journal:" + RecordPrefix(j.m.clientID)
}

// write puts subj's rotated record into the journal and syncs it to disk
// (the file, then the directory) before it returns.
func (j *journal) write(s *Settings, subj Subject, spent string, rec *Record) error {
	dir := journalDir(s)
	if dir == "" {
		return errors.New("no journal_dir")
	}
	copied := *rec
	copied.Tenant, copied.Account, copied.ClientID = subj.Tenant, subj.Account, j.m.clientID
	e := journalEntry{Tenant: subj.Tenant, Account: subj.Account, Spent: spent, Holder: j.m.holderID,
		WrittenAt: j.m.clock.Now().UTC(), Record: &copied}
	raw, err := s.Records.Encode(j.sealKey(), &e)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := writeSynced(dir, j.path(s, subj), raw); err != nil {
		return err
	}
	j.pending.Store(true)
	return nil
}

// writeSynced writes path through a temporary file that is synced and
// renamed into place, then syncs dir, so that a crash leaves either the old
// file or the whole new one.
func writeSynced(dir, path string, raw []byte) error {
	var suffix [6]byte
	_, _ = rand.Read(suffix[:])
	tmp := path + "." + hex.EncodeToString(suffix[:]) + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(raw)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// remove deletes subj's entry (the store has the record).
func (j *journal) remove(s *Settings, subj Subject) {
	path := j.path(s, subj)
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		j.m.Logger().Error("could not delete a journal entry the store has taken; it is offered to the store again and then dropped",
			append(subj.LogFields(), zap.Error(err))...)
		return
	}
	_ = syncDir(journalDir(s))
}

// read returns the entry at path (nil: none).
func (j *journal) read(s *Settings, path string) (*journalEntry, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var probe journalEntry
	plain, err := j.open(s, raw)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(plain, &probe); err != nil || probe.Record == nil || probe.Tenant == "" {
		return nil, fmt.Errorf("the journal entry %s holds no rotated record", filepath.Base(path))
	}
	if filepath.Clean(j.path(s, probe.subject())) != filepath.Clean(path) {
		return nil, fmt.Errorf("the journal entry %s names another subject than its file name", filepath.Base(path))
	}
	return &probe, nil
}

// open unseals an entry (plain JSON when no encryption_key is set).
func (j *journal) open(s *Settings, raw []byte) ([]byte, error) {
	var er EncryptedRecord
	if err := json.Unmarshal(raw, &er); err != nil {
		return nil, fmt.Errorf("a journal entry is damaged")
	}
	if er.Encrypted == "" {
		if len(s.Records.Keys) > 0 {
			return nil, fmt.Errorf("a journal entry is not encrypted although encryption_key is set")
		}
		return raw, nil
	}
	return s.Records.open(j.sealKey(), er)
}

// flushSubject writes subj's entry to the store, if there is one. An
// error means it is still in the journal (the store failed).
func (j *journal) flushSubject(ctx context.Context, s *Settings, subj Subject) error {
	if journalDir(s) == "" {
		return nil
	}
	path := j.path(s, subj)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil // the usual case, without waiting for a flush of others
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	e, err := j.read(s, path)
	if err != nil {
		j.m.Logger().Error("a journal entry cannot be read; it is left in place", append(subj.LogFields(), zap.Error(err))...)
		return nil
	}
	if e == nil {
		return nil
	}
	return j.flushEntry(ctx, s, e)
}

// flushAll writes every entry of the manager to the store. It reports
// whether entries remain.
func (j *journal) flushAll(ctx context.Context) (remain bool) {
	s := j.m.Settings.Load()
	dir := journalDir(s)
	if dir == "" {
		return false
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	names, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return false
	}
	if err != nil {
		j.m.Logger().Error("the journal directory cannot be read", zap.Error(err))
		return true
	}
	prefix := j.prefix(s)
	for _, de := range names {
		name := de.Name()
		if !strings.HasPrefix(name, prefix) || !strings.HasSuffix(name, JournalFileSuffix) {
			continue
		}
		if ctx.Err() != nil {
			return true
		}
		path := filepath.Join(dir, name)
		e, err := j.read(s, path)
		if err != nil {
			j.m.Logger().Error("a journal entry cannot be read; it is left in place", zap.String("entry", name), zap.Error(err))
			continue
		}
		if e == nil {
			continue
		}
		if err := j.flushEntry(ctx, s, e); err != nil {
			remain = true
		}
	}
	return remain
}

// flushLockWait is how long a journal flush waits for the subject's
// lock. A lock left by the rotation that wrote the entry (its holder could
// not release it while the store was down, or was stopped) lives on until
// its lease runs out; while the store's record still carries the entry's
// own in-flight mark, nobody else may write it, and the entry is written
// without the lock.
const flushLockWait = 500 * time.Millisecond

// errFlushLockBusy: the lock is held and the record is not marked by the
// entry's rotation; the entry waits for the next try.
var errFlushLockBusy = errors.New("the record's lock is held by another writer")

// flushEntry writes e's record to the store, unless the store's record
// moved on, and deletes e once the store has it (or it was dropped). The
// caller holds j.mu.
func (j *journal) flushEntry(ctx context.Context, s *Settings, e *journalEntry) error {
	m := j.m
	subj := e.subject()
	wctx, cancel := context.WithTimeout(ctx, journalWriteLimit)
	defer cancel()
	name := LockName(s.Records.ClientID, subj)
	lctx, lcancel := context.WithTimeout(wctx, flushLockWait)
	err := s.Records.Storage.Lock(lctx, name)
	busy := err != nil && lctx.Err() != nil && wctx.Err() == nil
	lcancel()
	if err != nil && !busy {
		return storageError("taking the lock", name, err)
	}
	if err == nil {
		defer func() {
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			_ = s.Records.Storage.Unlock(uctx, name)
		}()
	}
	var outcome string
	err = func() error {
		stored, err := s.Records.load(wctx, subj)
		if err != nil {
			return err
		}
		switch {
		case stored != nil && stored.RefreshToken == e.Record.RefreshToken:
			outcome = "already stored"
			if stored.RotatingBy != "" && !busy {
				stored.clearMark()
				return s.Records.save(wctx, subj, stored)
			}
			return nil
		case (stored == nil && e.Spent != tokenHash("")) || (stored != nil && tokenHash(stored.RefreshToken) != e.Spent):
			outcome = "moved on"
			return nil
		case busy && stored.RotatingBy != e.Holder:
			return errFlushLockBusy
		}
		rec := *e.Record
		rec.clearMark()
		if err := s.Records.save(wctx, subj, &rec); err != nil {
			return err
		}
		outcome = "stored"
		return nil
	}()
	if err != nil {
		return err
	}
	j.remove(s, subj)
	m.ledger.forgetStorageFailure(subj.Key())
	switch outcome {
	case "moved on":
		m.Logger().Warn("a rotated refresh token in the journal was dropped: the store's record moved on since (a new refresh token was handed over, or the record was deleted), and the journal never overwrites it",
			append(subj.LogFields(), zap.Time("rotated_at", e.WrittenAt))...)
	case "stored":
		m.Logger().Warn("the rotated refresh token kept in the journal is in the store now", subj.LogFields()...)
	}
	return nil
}

// loop offers the journal's entries to the store every
// JournalRetryInterval while any remain, and at once when kicked (a
// reconnect), until the manager is destroyed.
func (j *journal) loop() {
	m := j.m
	t := time.NewTicker(j.every)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		case <-j.kick:
			j.pending.Store(true)
		}
		if !j.pending.Load() || m.Settings.Load() == nil {
			continue
		}
		j.pending.Store(false)
		if j.flushAll(m.ctx) {
			j.pending.Store(true)
		}
	}
}

// wake asks the loop for a flush now (the store answers again).
func (j *journal) wake() {
	select {
	case j.kick <- struct{}{}:
	default:
	}
}

// flushAtShutdown offers what remains to the store, within
// journalShutdownBound.
func (j *journal) flushAtShutdown() {
	if !j.pending.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), journalShutdownBound)
	defer cancel()
	if j.flushAll(ctx) {
		j.m.Logger().Error("rotated refresh tokens remain in the journal at shutdown: the store did not take them; they are written to it when a sidecar starts again on the same journal_dir",
			zap.String("journal_dir", journalDir(j.m.Settings.Load())))
	}
}

// newHolderID is a random id of one manager: the holder of its in-flight
// marks.
func newHolderID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
