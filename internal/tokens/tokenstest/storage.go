package tokenstest

import (
	"context"
	"errors"
	"io/fs"
	"slices"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/certmagic"
)

// StorageSuite runs every promise of tokens.Storage (the token records'
// store and its per-name lock) against the stores newStorage makes.
// newStorage is called one or more times per case with the case's t: the
// stores of one t are handles on one store, as two sidecars (or two
// processes) have, and those of different cases share nothing. Listing is
// checked against Caddy's file storage, which is what tokens.Storage's
// callers were written against.
func StorageSuite(t *testing.T, newStorage func(t *testing.T) tokens.Storage) {
	run := func(name string, body func(t *testing.T, newStorage func(t *testing.T) tokens.Storage)) {
		t.Run(name, func(t *testing.T) { body(t, newStorage) })
	}
	run("StoreLoad", storeLoad)
	run("LoadMissing", loadMissing)
	run("Delete", deleteKey)
	run("ListAsFileStorage", listAsFileStorage)
	run("LockExcludes", lockExcludes)
	run("UnlockNotHeld", unlockNotHeld)
	run("LockHonoursContext", lockHonoursContext)
}

const (
	recordKey  = "fortnox/client/1234567.json"
	accountKey = "fortnox/client/accounts/1234567/anna.json"
)

// Store then Load gives back the bytes stored, to every handle; Store
// again replaces them.
func storeLoad(t *testing.T, newStorage func(t *testing.T) tokens.Storage) {
	c := ctx(t)
	a, b := newStorage(t), newStorage(t)
	value := []byte("{\"refresh_token\":\"r1\"}\n\x00\xff")
	if err := a.Store(c, recordKey, value); err != nil {
		t.Fatalf("Store: %v", err)
	}
	for i, s := range []tokens.Storage{a, b} {
		if got, err := s.Load(c, recordKey); err != nil || !slices.Equal(got, value) {
			t.Errorf("handle %d: Load = %q, %v; want %q", i, got, err, value)
		}
	}
	if err := b.Store(c, recordKey, []byte("v2")); err != nil {
		t.Fatalf("Store again: %v", err)
	}
	if got, err := a.Load(c, recordKey); err != nil || string(got) != "v2" {
		t.Errorf("Load after Store again = %q, %v; want %q", got, err, "v2")
	}
	if err := a.Store(c, accountKey, []byte("anna")); err != nil {
		t.Fatalf("Store in a folder not yet there: %v", err)
	}
	if got, err := b.Load(c, accountKey); err != nil || string(got) != "anna" {
		t.Errorf("Load of a key in a folder = %q, %v", got, err)
	}
}

// Load of a missing key answers an error that is fs.ErrNotExist, which
// the record store takes for "no record".
func loadMissing(t *testing.T, newStorage func(t *testing.T) tokens.Storage) {
	c := ctx(t)
	s := newStorage(t)
	if err := s.Store(c, recordKey, []byte("v")); err != nil {
		t.Fatalf("Store: %v", err)
	}
	for _, key := range []string{"fortnox/client/7654321.json", "fortnox/nobody/1234567.json", accountKey} {
		got, err := s.Load(c, key)
		if !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Load(%q) of a missing key = %q, %v; want an error that is fs.ErrNotExist", key, got, err)
		}
	}
}

// Delete removes the key (Load: fs.ErrNotExist; no longer listed) and
// nothing else; deleting a missing key is no error.
func deleteKey(t *testing.T, newStorage func(t *testing.T) tokens.Storage) {
	c := ctx(t)
	a, b := newStorage(t), newStorage(t)
	for _, key := range []string{recordKey, accountKey, "fortnox/client/7654321.json"} {
		if err := a.Store(c, key, []byte(key)); err != nil {
			t.Fatalf("Store(%q): %v", key, err)
		}
	}
	if err := b.Delete(c, recordKey); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if got, err := a.Load(c, recordKey); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load after Delete = %q, %v; want fs.ErrNotExist", got, err)
	}
	if keys, err := a.List(c, "fortnox/client", false); err != nil || slices.Contains(keys, recordKey) {
		t.Errorf("List after Delete = %q, %v; want it without %s", keys, err, recordKey)
	}
	for _, key := range []string{accountKey, "fortnox/client/7654321.json"} {
		if got, err := a.Load(c, key); err != nil || string(got) != key {
			t.Errorf("another key after Delete: Load(%q) = %q, %v", key, got, err)
		}
	}
	if err := b.Delete(c, recordKey); err != nil {
		t.Errorf("Delete of a key already deleted: %v", err)
	}
	if err := b.Delete(c, "fortnox/nobody/1234567.json"); err != nil {
		t.Errorf("Delete of a key never stored: %v", err)
	}
	if err := a.Store(c, recordKey, []byte("back")); err != nil {
		t.Fatalf("Store after Delete: %v", err)
	}
	if got, err := b.Load(c, recordKey); err != nil || string(got) != "back" {
		t.Errorf("Load of a key stored again after Delete = %q, %v", got, err)
	}
}

// List lists as Caddy's file storage does, on the paths the record store
// lists (records, accounts, the quarantine, notifications): not recursive,
// exactly the direct children, keys and folders, each once; recursive,
// every key below, and no entry file storage would not list (folders may
// be left out: the callers skip them). A path that holds nothing answers
// nothing, or an error that is fs.ErrNotExist, as file storage does.
func listAsFileStorage(t *testing.T, newStorage func(t *testing.T) tokens.Storage) {
	c := ctx(t)
	s := newStorage(t)
	ref := &certmagic.FileStorage{Path: t.TempDir()}
	keys := []string{
		"fortnox/client/1234567.json",
		"fortnox/client/7654321.json",
		"fortnox/client/accounts/1234567/anna.json",
		"fortnox/client/accounts/1234567/bo.json",
		"fortnox/client/accounts/7654321/anna.json",
		"fortnox/client/quarantine/1234567-1.json",
		"fortnox/client/notify/pending/a",
		"fortnox/client-old/1234567.json",
		"fortnox/other%20client/1234567.json",
	}
	for _, key := range keys {
		for _, st := range []tokens.Storage{s, ref} {
			if err := st.Store(c, key, []byte(key)); err != nil {
				t.Fatalf("Store(%q): %v", key, err)
			}
		}
	}
	for _, dir := range []string{
		"fortnox", "fortnox/client", "fortnox/client/", "fortnox/client/accounts",
		"fortnox/client/accounts/1234567", "fortnox/client/quarantine", "fortnox/client/notify/pending",
		"fortnox/other%20client", "fortnox/client/1234567.json", "fortnox/cli", "fortnox/nobody", "fortnox/client/accounts/1111111",
	} {
		for _, recursive := range []bool{false, true} {
			want, werr := ref.List(c, dir, recursive)
			got, err := s.List(c, dir, recursive)
			slices.Sort(want)
			sorted := slices.Sorted(slices.Values(got))
			switch {
			case werr != nil && !errors.Is(werr, fs.ErrNotExist):
				t.Fatalf("file storage: List(%q, %v): %v", dir, recursive, werr)
			case werr != nil || len(want) == 0:
				if (err != nil && !errors.Is(err, fs.ErrNotExist)) || len(got) != 0 {
					t.Errorf("List(%q, %v) of a path that holds nothing = %q, %v; want nothing, or fs.ErrNotExist", dir, recursive, got, err)
				}
			case err != nil:
				t.Errorf("List(%q, %v): %v", dir, recursive, err)
			case len(slices.Compact(slices.Clone(sorted))) != len(got):
				t.Errorf("List(%q, %v) = %q: an entry listed twice", dir, recursive, got)
			case !recursive && !slices.Equal(sorted, want):
				t.Errorf("List(%q, false) = %q; file storage lists %q", dir, sorted, want)
			case recursive:
				for _, k := range sorted {
					if !slices.Contains(want, k) {
						t.Errorf("List(%q, true) lists %q, which file storage does not (it lists %q)", dir, k, want)
					}
				}
				for _, k := range want {
					if slices.Contains(keys, k) && !slices.Contains(sorted, k) {
						t.Errorf("List(%q, true) = %q, without the key %q", dir, sorted, k)
					}
				}
			}
		}
	}
}

// Lock excludes a second locker, through the same handle or another one,
// until Unlock; another name is another lock.
func lockExcludes(t *testing.T, newStorage func(t *testing.T) tokens.Storage) {
	c := ctx(t)
	a, b := newStorage(t), newStorage(t)
	const name = "fortnox/client/1234567"
	if err := a.Lock(c, name); err != nil {
		t.Fatalf("Lock: %v", err)
	}
	if err := b.Lock(c, name+"/accounts/anna"); err != nil {
		t.Fatalf("Lock of another name while one is held: %v", err)
	}
	if err := b.Unlock(c, name+"/accounts/anna"); err != nil {
		t.Errorf("Unlock of the other name: %v", err)
	}
	for i, s := range []tokens.Storage{a, b} {
		got := done(func() error { return s.Lock(c, name) })
		if ok, err := returnedWithin(got, 300*time.Millisecond); ok {
			t.Fatalf("handle %d: a second Lock returned (%v) while the lock was held", i, err)
		}
		if err := a.Unlock(c, name); err != nil {
			t.Fatalf("Unlock: %v", err)
		}
		// File storage looks again every second.
		if ok, err := returnedWithin(got, 3*time.Second); !ok || err != nil {
			t.Fatalf("handle %d: the second Lock once the first was unlocked: returned %v, %v", i, ok, err)
		}
		// It holds the lock now; hand it back to a.
		if err := s.Unlock(c, name); err != nil {
			t.Fatalf("handle %d: Unlock: %v", i, err)
		}
		if err := a.Lock(c, name); err != nil {
			t.Fatalf("Lock again: %v", err)
		}
	}
	if err := a.Unlock(c, name); err != nil {
		t.Errorf("Unlock: %v", err)
	}
}

// Unlock of a lock that is not held (never taken, or unlocked already)
// may answer an error, but harms nothing: no lock held under another name
// is freed, and the name locks as usual afterwards.
func unlockNotHeld(t *testing.T, newStorage func(t *testing.T) tokens.Storage) {
	c := ctx(t)
	a, b := newStorage(t), newStorage(t)
	const name, held = "fortnox/client/1234567", "fortnox/client/7654321"
	if err := a.Lock(c, held); err != nil {
		t.Fatalf("Lock: %v", err)
	}
	unlocked := done(func() error { return b.Unlock(c, name) })
	if ok, _ := returnedWithin(unlocked, 2*time.Second); !ok {
		t.Fatal("Unlock of a lock never taken did not return")
	}
	if err := a.Lock(c, name); err != nil {
		t.Fatalf("Lock after an Unlock of it while not held: %v", err)
	}
	if err := a.Unlock(c, name); err != nil {
		t.Errorf("Unlock: %v", err)
	}
	if ok, _ := returnedWithin(done(func() error { return a.Unlock(c, name) }), 2*time.Second); !ok {
		t.Fatal("a second Unlock did not return")
	}
	got := done(func() error { return b.Lock(c, held) })
	if ok, err := returnedWithin(got, 300*time.Millisecond); ok {
		t.Fatalf("the lock of %s was freed by Unlocks of another name: a second Lock returned (%v)", held, err)
	}
	if err := a.Unlock(c, held); err != nil {
		t.Errorf("Unlock: %v", err)
	}
	if ok, err := returnedWithin(got, 3*time.Second); !ok || err != nil {
		t.Fatalf("Lock once the holder unlocked: returned %v, %v", ok, err)
	}
	if err := b.Unlock(c, held); err != nil {
		t.Errorf("Unlock: %v", err)
	}
}

// A Lock that waits for a held lock gives up, with an error, when its
// context is done, and leaves the lock to its holder.
func lockHonoursContext(t *testing.T, newStorage func(t *testing.T) tokens.Storage) {
	c := ctx(t)
	a, b := newStorage(t), newStorage(t)
	const name = "fortnox/client/1234567"
	if err := a.Lock(c, name); err != nil {
		t.Fatalf("Lock: %v", err)
	}
	wait := 200 * time.Millisecond
	wctx, cancel := context.WithTimeout(c, wait)
	defer cancel()
	start := time.Now()
	err := b.Lock(wctx, name)
	took := time.Since(start)
	if err == nil {
		t.Fatal("Lock with a deadline took a held lock")
	}
	if took < wait/2 || took > wait+time.Second {
		t.Errorf("Lock with a deadline of %v gave up after %v", wait, took)
	}
	cctx, cancel := context.WithCancel(c)
	got := done(func() error { return b.Lock(cctx, name) })
	time.Sleep(50 * time.Millisecond)
	cancel()
	if ok, err := returnedWithin(got, time.Second); !ok || err == nil {
		t.Errorf("Lock whose context was cancelled while it waited: returned %v, %v; want an error at once", ok, err)
	}
	// The holder still holds it, and frees it for the next.
	third := newStorage(t)
	next := done(func() error { return third.Lock(c, name) })
	if ok, err := returnedWithin(next, 200*time.Millisecond); ok {
		t.Fatalf("Lock returned (%v) while the first holder held the lock: a Lock that gave up took it", err)
	}
	if err := a.Unlock(c, name); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if ok, err := returnedWithin(next, 3*time.Second); !ok || err != nil {
		t.Fatalf("Lock once the holder unlocked: returned %v, %v", ok, err)
	}
	if err := third.Unlock(c, name); err != nil {
		t.Errorf("Unlock: %v", err)
	}
}
