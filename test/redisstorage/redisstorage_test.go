package redisstorage

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
)

// newStorage returns a Storage with its own Redis client (as a separate
// process would have).
func newStorage(t *testing.T, addr, prefix string, ttl time.Duration) *Storage {
	t.Helper()
	client := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { client.Close() })
	return New(client, prefix, ttl)
}

func mustStore(t *testing.T, s certmagic.Storage, key, value string) {
	t.Helper()
	if err := s.Store(t.Context(), key, []byte(value)); err != nil {
		t.Fatalf("Store(%q): %v", key, err)
	}
}

func mustList(t *testing.T, s certmagic.Storage, dir string, recursive bool) []string {
	t.Helper()
	keys, err := s.List(t.Context(), dir, recursive)
	if err != nil {
		t.Fatalf("List(%q, %v): %v", dir, recursive, err)
	}
	return keys
}

func TestStorageSemantics(t *testing.T) {
	ctx := t.Context()
	s := newStorage(t, testproc.StartRedis(t, testproc.RedisConfig{}).Addr(), "conf", 0)

	// missing keys: fs.ErrNotExist from Load, Stat and List
	if _, err := s.Load(ctx, "nope/x"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load missing: err = %v, want fs.ErrNotExist", err)
	}
	if _, err := s.Stat(ctx, "nope"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Stat missing: err = %v, want fs.ErrNotExist", err)
	}
	if _, err := s.List(ctx, "nope", true); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("List missing: err = %v, want fs.ErrNotExist", err)
	}
	if s.Exists(ctx, "nope") {
		t.Fatal("Exists(missing) = true")
	}
	if err := s.Delete(ctx, "nope"); err != nil {
		t.Fatalf("Delete(missing) = %v, want nil", err)
	}

	before := time.Now()
	for _, k := range []string{"a/b/c.txt", "a/b/d.txt", "a/e.txt", "f.txt", "ab/x", "a.b/y"} {
		mustStore(t, s, k, "value of "+k)
	}
	after := time.Now()

	// Load, overwrite, binary and empty values
	if v, err := s.Load(ctx, "a/b/c.txt"); err != nil || string(v) != "value of a/b/c.txt" {
		t.Fatalf("Load = %q, %v", v, err)
	}
	mustStore(t, s, "a/e.txt", "new")
	if v, err := s.Load(ctx, "a/e.txt"); err != nil || string(v) != "new" {
		t.Fatalf("Load after overwrite = %q, %v", v, err)
	}
	bin := []byte{0, 1, 2, 0xff, '\r', '\n', 0}
	if err := s.Store(ctx, "bin", bin); err != nil {
		t.Fatal(err)
	}
	if v, err := s.Load(ctx, "bin"); err != nil || !slices.Equal(v, bin) {
		t.Fatalf("Load binary = %v, %v", v, err)
	}
	mustStore(t, s, "empty", "")
	if v, err := s.Load(ctx, "empty"); err != nil || len(v) != 0 {
		t.Fatalf("Load empty = %q, %v", v, err)
	}
	// keys are cleaned like paths
	if v, err := s.Load(ctx, "/a//b/./c.txt/"); err != nil || string(v) != "value of a/b/c.txt" {
		t.Fatalf("Load uncleaned key = %q, %v", v, err)
	}

	// Exists: files and implicit directories, component-wise prefixes
	for key, want := range map[string]bool{
		"a": true, "a/b": true, "a/b/c.txt": true, "ab": true, "f.txt": true,
		"a/b/c": false, "a/x": false, "b": false, "a/b/c.txt/z": false, "": true,
	} {
		if got := s.Exists(ctx, key); got != want {
			t.Errorf("Exists(%q) = %v, want %v", key, got, want)
		}
	}

	// List
	for _, tc := range []struct {
		dir       string
		recursive bool
		want      []string
	}{
		{"a", false, []string{"a/b", "a/e.txt"}},
		{"a", true, []string{"a/b", "a/b/c.txt", "a/b/d.txt", "a/e.txt"}},
		{"a/b", false, []string{"a/b/c.txt", "a/b/d.txt"}},
		{"", false, []string{"a", "a.b", "ab", "bin", "empty", "f.txt"}},
		{"", true, []string{"a", "a.b", "a.b/y", "a/b", "a/b/c.txt", "a/b/d.txt", "a/e.txt", "ab", "ab/x", "bin", "empty", "f.txt"}},
		{"f.txt", false, nil}, // a file lists as empty, as in FileStorage
	} {
		if got := mustList(t, s, tc.dir, tc.recursive); !slices.Equal(got, tc.want) {
			t.Errorf("List(%q, %v) = %q, want %q", tc.dir, tc.recursive, got, tc.want)
		}
	}

	// Stat
	info, err := s.Stat(ctx, "a/b/d.txt")
	if err != nil {
		t.Fatal(err)
	}
	if info.Key != "a/b/d.txt" || !info.IsTerminal || info.Size != int64(len("value of a/b/d.txt")) ||
		info.Modified.Before(before.Add(-time.Millisecond)) || info.Modified.After(after.Add(time.Millisecond)) {
		t.Errorf("Stat(file) = %+v (stored between %v and %v)", info, before, after)
	}
	info, err = s.Stat(ctx, "a/b")
	if err != nil || info.Key != "a/b" || info.IsTerminal {
		t.Errorf("Stat(dir) = %+v, %v", info, err)
	}

	// the tree stays a tree: no key under a file, no file at a directory
	if err := s.Store(ctx, "f.txt/sub", []byte("x")); !errors.Is(err, ErrParentIsFile) {
		t.Errorf("Store under a file: err = %v, want ErrParentIsFile", err)
	}
	if err := s.Store(ctx, "a/b", []byte("x")); !errors.Is(err, ErrIsDirectory) {
		t.Errorf("Store at a directory: err = %v, want ErrIsDirectory", err)
	}
	if err := s.Store(ctx, "/", []byte("x")); err == nil {
		t.Error("Store at the root succeeded")
	}

	// Delete a file, then a directory with everything under it
	if err := s.Delete(ctx, "a/b/c.txt"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(ctx, "a/b/c.txt"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load deleted: err = %v", err)
	}
	if got := mustList(t, s, "a/b", false); !slices.Equal(got, []string{"a/b/d.txt"}) {
		t.Errorf("List after delete = %q", got)
	}
	if err := s.Delete(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"a", "a/b", "a/b/d.txt", "a/e.txt"} {
		if s.Exists(ctx, k) {
			t.Errorf("Exists(%q) after Delete(a)", k)
		}
	}
	if !s.Exists(ctx, "ab/x") || !s.Exists(ctx, "a.b/y") {
		t.Error("Delete(a) deleted keys that only share a string prefix")
	}
	// a deleted directory can become a file
	mustStore(t, s, "a", "now a file")

	// another prefix on the same server sees none of it
	other := newStorage(t, s.client.Options().Addr, "other", 0)
	if other.Exists(ctx, "ab/x") {
		t.Error("prefixes are not isolated")
	}
	if keys := mustList(t, other, "", true); len(keys) != 0 {
		t.Errorf("other prefix lists %q", keys)
	}
}

// TestListMatchesFileStorage stores the same keys in certmagic.FileStorage
// and in Redis and compares what List, Exists and Stat say.
func TestListMatchesFileStorage(t *testing.T) {
	ctx := t.Context()
	rs := newStorage(t, testproc.StartRedis(t, testproc.RedisConfig{}).Addr(), "cmp", 0)
	fsys := &certmagic.FileStorage{Path: t.TempDir()}
	keys := []string{
		"certificates/acme/example.com/example.com.crt",
		"certificates/acme/example.com/example.com.key",
		"certificates/acme/a.example.com/a.example.com.json",
		"fortnox/tenants/t1/refresh",
		"fortnox/tenants/t2/refresh",
		"fortnox/tenants-old",
		"top",
	}
	for _, k := range keys {
		mustStore(t, rs, k, k)
		mustStore(t, fsys, k, k)
	}
	for _, dir := range []string{"", "certificates", "certificates/acme", "fortnox", "fortnox/tenants", "top"} {
		for _, rec := range []bool{false, true} {
			got := mustList(t, rs, dir, rec)
			want := mustList(t, fsys, dir, rec)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("List(%q, %v): redis %q, file storage %q", dir, rec, got, want)
			}
		}
	}
	for _, k := range []string{"certificates", "certificates/acme/example.com", "fortnox/tenants/t1/refresh", "fortnox/tenants-old", "fortnox/ten", "nope"} {
		if got, want := rs.Exists(ctx, k), fsys.Exists(ctx, k); got != want {
			t.Errorf("Exists(%q): redis %v, file storage %v", k, got, want)
		}
		ri, rerr := rs.Stat(ctx, k)
		fi, ferr := fsys.Stat(ctx, k)
		if errors.Is(rerr, fs.ErrNotExist) != errors.Is(ferr, fs.ErrNotExist) || ri.IsTerminal != fi.IsTerminal || ri.Size != fi.Size && ri.IsTerminal {
			t.Errorf("Stat(%q): redis %+v %v, file storage %+v %v", k, ri, rerr, fi, ferr)
		}
	}
}

// TestLockMutualExclusion runs goroutines on two Storage instances (each
// with its own connection pool, like two replicas) that each increment a
// counter kept in the storage, under the lock. No increment may be lost
// and no two critical sections may overlap.
func TestLockMutualExclusion(t *testing.T) {
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	instances := []*Storage{newStorage(t, addr, "mx", time.Second), newStorage(t, addr, "mx", time.Second)}
	const perInstance, iterations = 4, 25

	var inside, overlaps atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, len(instances)*perInstance)
	for _, s := range instances {
		for range perInstance {
			wg.Go(func() {
				ctx := t.Context()
				for range iterations {
					if err := s.Lock(ctx, "counter"); err != nil {
						errs <- err
						return
					}
					if inside.Add(1) != 1 {
						overlaps.Add(1)
					}
					n := 0
					if v, err := s.Load(ctx, "counter"); err == nil {
						n, _ = strconv.Atoi(string(v))
					} else if !errors.Is(err, fs.ErrNotExist) {
						errs <- err
					}
					time.Sleep(100 * time.Microsecond) // widen the race window
					if err := s.Store(ctx, "counter", []byte(strconv.Itoa(n+1))); err != nil {
						errs <- err
					}
					inside.Add(-1)
					if err := s.Unlock(ctx, "counter"); err != nil {
						errs <- err
						return
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := overlaps.Load(); n > 0 {
		t.Errorf("%d critical sections overlapped", n)
	}
	v, err := instances[0].Load(t.Context(), "counter")
	if err != nil {
		t.Fatal(err)
	}
	if want := strconv.Itoa(len(instances) * perInstance * iterations); string(v) != want {
		t.Errorf("counter = %s, want %s (lost updates)", v, want)
	}
}

// TestLockRefresh holds a lock for several TTLs: the refresher must keep
// it, and only Unlock frees it.
func TestLockRefresh(t *testing.T) {
	ctx := t.Context()
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	a := newStorage(t, addr, "rf", 300*time.Millisecond)
	b := newStorage(t, addr, "rf", 300*time.Millisecond)
	if err := a.Lock(ctx, "job"); err != nil {
		t.Fatal(err)
	}
	for range 4 {
		time.Sleep(250 * time.Millisecond)
		if ok, err := b.TryLock(ctx, "job"); ok || err != nil {
			t.Fatalf("TryLock by b while a holds the lock = %v, %v", ok, err)
		}
	}
	if err := a.Unlock(ctx, "job"); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryLock(ctx, "job"); !ok || err != nil {
		t.Fatalf("TryLock by b after Unlock = %v, %v", ok, err)
	}
	if err := b.Unlock(ctx, "job"); err != nil {
		t.Fatal(err)
	}
}

// TestDeadHolderLockExpires takes a lock and stops refreshing it without
// unlocking, as a killed process would; another instance must get the
// lock once the TTL has run out, not before and not much later.
func TestDeadHolderLockExpires(t *testing.T) {
	ctx := t.Context()
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	const ttl = time.Second
	a := newStorage(t, addr, "dead", ttl)
	b := newStorage(t, addr, "dead", ttl)
	if err := a.Lock(ctx, "tenant-1"); err != nil {
		t.Fatal(err)
	}
	locked := time.Now()
	a.abandonLock("tenant-1")
	if ok, _ := b.TryLock(ctx, "tenant-1"); ok {
		t.Fatal("b got the lock right after a abandoned it")
	}
	lctx, cancel := context.WithTimeout(ctx, 3*ttl)
	defer cancel()
	if err := b.Lock(lctx, "tenant-1"); err != nil {
		t.Fatalf("b.Lock after a died: %v", err)
	}
	waited := time.Since(locked)
	t.Logf("lock freed %v after the dead holder took it (TTL %v)", waited, ttl)
	if waited < ttl-50*time.Millisecond || waited > ttl+500*time.Millisecond {
		t.Errorf("b waited %v for a lock with TTL %v", waited, ttl)
	}
	if err := a.Unlock(ctx, "tenant-1"); !errors.Is(err, ErrLockNotHeld) {
		t.Errorf("a.Unlock of the abandoned lock: err = %v, want ErrLockNotHeld", err)
	}
	if err := b.Unlock(ctx, "tenant-1"); err != nil {
		t.Fatal(err)
	}
}

// TestMain runs the tests, or, started by TestKilledProcessLockExpires
// with holderAddrEnv set, the lock holder it kills. The holder is not a
// test function (which would have to skip itself in every normal run, and
// CI runs nothing skipped).
func TestMain(m *testing.M) {
	if addr := os.Getenv(holderAddrEnv); addr != "" {
		holdLockUntilKilled(addr)
		return
	}
	if !testproc.CheckBinaries("test/redisstorage: the tests that need Redis", "redis-server") {
		os.Exit(1)
	}
	os.Exit(m.Run())
}

const (
	holderAddrEnv = "REDISSTORAGE_HOLDER_ADDR"
	holderTTLEnv  = "REDISSTORAGE_HOLDER_TTL"
)

// holdLockUntilKilled takes the lock "tenant-1", says LOCKED on stdout and
// keeps refreshing the lock until the process is killed.
func holdLockUntilKilled(addr string) {
	ttl, err := time.ParseDuration(os.Getenv(holderTTLEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, "lock holder:", holderTTLEnv, err)
		os.Exit(2)
	}
	s := New(redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true}), "killed", ttl)
	if err := s.Lock(context.Background(), "tenant-1"); err != nil {
		fmt.Fprintln(os.Stderr, "lock holder:", err)
		os.Exit(2)
	}
	fmt.Println("LOCKED")
	select {} // hold (and refresh) the lock until killed
}

// TestKilledProcessLockExpires kills (SIGKILL) a separate process that
// holds and refreshes a lock; another instance gets it within the TTL.
func TestKilledProcessLockExpires(t *testing.T) {
	ctx := t.Context()
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	const ttl = time.Second
	// The test binary itself, as the lock holder (see TestMain).
	cmd := exec.Command(os.Args[0], "-test.timeout=1m")
	cmd.Env = append(os.Environ(), holderAddrEnv+"="+addr, holderTTLEnv+"="+ttl.String())
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "LOCKED\n" {
		t.Fatalf("helper said %q, %v", line, err)
	}

	s := newStorage(t, addr, "killed", ttl)
	// The holder refreshes: for a while, nobody else gets the lock.
	time.Sleep(2 * ttl)
	if ok, err := s.TryLock(ctx, "tenant-1"); ok || err != nil {
		t.Fatalf("TryLock while the helper holds the lock = %v, %v", ok, err)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	lctx, cancel := context.WithTimeout(ctx, 3*ttl)
	defer cancel()
	if err := s.Lock(lctx, "tenant-1"); err != nil {
		t.Fatalf("Lock after the holder was killed: %v", err)
	}
	waited := time.Since(killed)
	t.Logf("lock freed %v after SIGKILL (TTL %v)", waited, ttl)
	if waited > ttl+500*time.Millisecond {
		t.Errorf("waited %v after SIGKILL for a lock with TTL %v", waited, ttl)
	}
	if err := s.Unlock(ctx, "tenant-1"); err != nil {
		t.Fatal(err)
	}
}

func TestUnlockOnlyOwnLock(t *testing.T) {
	ctx := t.Context()
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	a := newStorage(t, addr, "own", 0)
	b := newStorage(t, addr, "own", 0)
	if err := a.Unlock(ctx, "x"); !errors.Is(err, ErrLockNotHeld) {
		t.Errorf("Unlock of a lock never taken: err = %v", err)
	}
	if err := a.Lock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if err := b.Unlock(ctx, "x"); !errors.Is(err, ErrLockNotHeld) {
		t.Errorf("Unlock by another instance: err = %v", err)
	}
	if ok, _ := b.TryLock(ctx, "x"); ok {
		t.Fatal("another instance's Unlock released the lock")
	}
	// a lock that expired under its holder is reported at Unlock
	if err := a.client.Del(ctx, a.lockKey("x")).Err(); err != nil {
		t.Fatal(err)
	}
	if err := a.Unlock(ctx, "x"); !errors.Is(err, ErrLockNotHeld) {
		t.Errorf("Unlock of an expired lock: err = %v", err)
	}
	if err := a.Unlock(ctx, "x"); !errors.Is(err, ErrLockNotHeld) {
		t.Errorf("second Unlock: err = %v", err)
	}
}

func TestLockHonorsContext(t *testing.T) {
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	a := newStorage(t, addr, "ctx", 0)
	b := newStorage(t, addr, "ctx", 0)
	if err := a.Lock(t.Context(), "x"); err != nil {
		t.Fatal(err)
	}
	defer a.Unlock(t.Context(), "x")
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := b.Lock(ctx, "x")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock with a deadline while held: err = %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Lock returned %v after its deadline of 200ms", d)
	}
	if ok, err := b.TryLock(ctx, "x"); ok || err == nil {
		t.Errorf("TryLock with a done context = %v, %v", ok, err)
	}
}

// loadCaddy runs cfg as the process's Caddy config until the test ends.
func loadCaddy(t *testing.T, cfg []byte) {
	t.Helper()
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("caddy.Load: %v\n%s", err, cfg)
	}
	t.Cleanup(func() { caddy.Stop() })
}

const caddyAdmin = `"admin": {"disabled": true, "config": {"persist": false}}`

// TestModuleFromJSON configures Caddy's storage as the module from JSON and
// checks that ctx.Storage() is a Storage on the configured server/prefix.
func TestModuleFromJSON(t *testing.T) {
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	t.Setenv("REDISSTORAGE_TEST_ADDR", addr)
	loadCaddy(t, []byte(`{`+caddyAdmin+`,
		"storage": {"module": "fortnox_test_redis", "address": "{env.REDISSTORAGE_TEST_ADDR}", "prefix": "fromjson", "lock_ttl": "2s"}}`))

	st, ok := caddy.ActiveContext().Storage().(*Storage)
	if !ok {
		t.Fatalf("ctx.Storage() is %T", caddy.ActiveContext().Storage())
	}
	if st.prefix != "fromjson" || st.ttl != 2*time.Second || st.client.Options().Addr != addr {
		t.Errorf("provisioned %s with TTL %v", st, st.ttl)
	}
	mustStore(t, st, "fortnox/t1", "token")
	other := newStorage(t, addr, "fromjson", 0)
	if v, err := other.Load(t.Context(), "fortnox/t1"); err != nil || string(v) != "token" {
		t.Errorf("another instance loads %q, %v", v, err)
	}
}

// TestModuleFromCaddyfile adapts the global option from a Caddyfile and runs
// the result.
func TestModuleFromCaddyfile(t *testing.T) {
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	caddyfile := fmt.Sprintf(`{
	admin off
	persist_config off
	storage fortnox_test_redis {
		address %s
		prefix x
		lock_ttl 1500ms
	}
}
`, addr)
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil || len(warnings) > 0 {
		t.Fatalf("adapt: %v %v", err, warnings)
	}
	var parsed struct {
		Storage map[string]any `json:"storage"`
	}
	if err := json.Unmarshal(cfg, &parsed); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"module": "fortnox_test_redis", "address": addr, "prefix": "x", "lock_ttl": float64(1500 * time.Millisecond)}
	if fmt.Sprint(parsed.Storage) != fmt.Sprint(want) {
		t.Errorf("adapted storage = %v, want %v", parsed.Storage, want)
	}
	loadCaddy(t, cfg)
	st, ok := caddy.ActiveContext().Storage().(*Storage)
	if !ok || st.prefix != "x" || st.ttl != 1500*time.Millisecond {
		t.Fatalf("ctx.Storage() = %v (%T)", caddy.ActiveContext().Storage(), caddy.ActiveContext().Storage())
	}

	// the inline form: storage fortnox_test_redis <address>
	cfg, _, err = caddyconfig.GetAdapter("caddyfile").Adapt([]byte("{\n\tstorage fortnox_test_redis "+addr+"\n}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(cfg, &parsed); err != nil {
		t.Fatal(err)
	}
	if parsed.Storage["address"] != addr {
		t.Errorf("inline form adapted to %v", parsed.Storage)
	}
	for _, bad := range []string{"lock_ttl soon", "colour blue", "prefix"} {
		_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte("{\n\tstorage fortnox_test_redis {\n\t\t"+bad+"\n\t}\n}\n"), nil)
		if err == nil {
			t.Errorf("Caddyfile option %q accepted", bad)
		}
	}
}

func provision(t *testing.T, m *Module) error {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	t.Cleanup(cancel)
	return m.Provision(ctx)
}

func TestModuleProvisionErrors(t *testing.T) {
	addr := testproc.StartRedis(t, testproc.RedisConfig{}).Addr()
	for name, m := range map[string]*Module{
		"no address":    {},
		"bad address":   {Address: "localhost"},
		"short ttl":     {Address: addr, LockTTL: caddy.Duration(time.Millisecond)},
		"nobody there":  {Address: "127.0.0.1:1"},
		"empty env var": {Address: "{env.REDISSTORAGE_UNSET_VARIABLE}"},
	} {
		if err := provision(t, m); err == nil {
			t.Errorf("%s: Provision succeeded", name)
			m.Cleanup()
		}
	}
	if _, err := new(Module).CertMagicStorage(); err == nil {
		t.Error("CertMagicStorage before Provision succeeded")
	}
	m := &Module{Address: addr}
	if err := provision(t, m); err != nil {
		t.Fatal(err)
	}
	defer m.Cleanup()
	if m.storage.prefix != "caddy" || m.storage.ttl != DefaultLockTTL {
		t.Errorf("defaults: %s with TTL %v", m.storage, m.storage.ttl)
	}
}

// TestModuleCleanupWaitsForUnlock: Cleanup (config unload) while a lock is
// held keeps the client open until the holder unlocks, then closes it.
func TestModuleCleanupWaitsForUnlock(t *testing.T) {
	ctx := t.Context()
	m := &Module{Address: testproc.StartRedis(t, testproc.RedisConfig{}).Addr(), LockTTL: caddy.Duration(300 * time.Millisecond)}
	if err := provision(t, m); err != nil {
		t.Fatal(err)
	}
	st, err := m.CertMagicStorage()
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Lock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if err := m.Cleanup(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // the refresher must still work
	mustStore(t, st, "k", "v")
	if err := st.Unlock(ctx, "x"); err != nil {
		t.Fatalf("Unlock after Cleanup: %v", err)
	}
	if err := st.Store(ctx, "k", []byte("v")); !errors.Is(err, redis.ErrClosed) {
		t.Errorf("Store after Cleanup and Unlock: err = %v, want the client closed", err)
	}
}
