package redisstate

import (
	"context"
	"errors"
	"io/fs"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Every key of one (client id, tenant) hashes to one Cluster slot: the
// record, its lock (and the token lock), an account's record and lock, the
// rate budget's three keys, the shared tokens, the invalidations and the
// event time.
func TestTenantKeysShareOneSlot(t *testing.T) {
	const cid, tenant = "my client", "1234567"
	tenantSubj, anna := tokens.Subject{Tenant: tenant}, tokens.Subject{Tenant: tenant, Account: "anna"}
	b := &Backend{c: &Conn{owner: shareOwner{id: cid}}}
	keys := []string{
		RecordKey(tokens.RecordKey(cid, tenantSubj)),
		RecordKey(tokens.RecordKey(cid, anna)),
		RecordKey(tokens.RecordPrefix(cid) + tenant + ".inflight"), // a companion beside the record
		LockKey(tokens.LockName(cid, tenantSubj)),
		LockKey(tokens.LockName(cid, tenantSubj) + "/token"),
		LockKey(tokens.LockName(cid, anna)),
		LockKey(tokens.LockName(cid, anna) + "/token"),
		TurnsKey(cid, tenant), TurnsKey(cid, tenant) + ":pause", TurnsKey(cid, tenant) + ":generation",
		TokenKey(cid, tenantSubj), TokenKey(cid, anna),
		b.tenantKey("invalidations", tenant) + ":" + anna.Key(),
		b.tenantKey("event", tenant),
	}
	want := keySlot(keys[0])
	for _, k := range keys {
		if got := keySlot(k); got != want {
			t.Errorf("%s: slot %d, want %d (the tenant's)", k, got, want)
		}
	}
	if other := keySlot(RecordKey(tokens.RecordKey(cid, tokens.Subject{Tenant: "7654321"}))); other == want {
		t.Errorf("another tenant's record hashes to the same slot %d: is the tag the tenant's?", other)
	}
	if name := lockOfRecord(tokens.RecordKey(cid, anna)); name != tokens.LockName(cid, anna) {
		t.Errorf("lockOfRecord(account) = %q, want %q", name, tokens.LockName(cid, anna))
	}
	if name := lockOfRecord(tokens.RecordKey(cid, tenantSubj)); name != tokens.LockName(cid, tenantSubj) {
		t.Errorf("lockOfRecord(tenant) = %q, want %q", name, tokens.LockName(cid, tenantSubj))
	}
}

// keySlot is Redis Cluster's HASH_SLOT: CRC16 of the hash tag (the text
// between the first { and the next }, when not empty), mod 16384.
func keySlot(key string) int {
	if i := indexByte(key, '{'); i >= 0 {
		if j := indexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc) % 16384
}

func indexByte(s string, c byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == c {
			return i
		}
	}
	return -1
}

// A record written by an earlier version (no hash tag) moves to its tagged
// key on first Load, under both the old lock and the new one: while an
// old sidecar holds the old lock (mid-refresh), the move waits, and takes
// the token the old sidecar wrote last. The old key then holds a
// tombstone, so an old sidecar refuses instead of spending the chain; a
// Store of a record the old layout still holds retires it too; Delete
// deletes both.
func TestLegacyRecordMovesUnderBothLocks(t *testing.T) {
	r, client := startLimiterRedis(t)
	ctx := context.Background()
	const cid = "migrate"
	opts, err := ParseRedisURL("redis://" + r.Addr() + "/0")
	if err != nil {
		t.Fatal(err)
	}
	c := New(t.Name(), shareOwner{limiterOwner{clk: clock.New()}, cid}, opts, "redis://"+r.Addr()+"/0", zap.NewNop(), func() {})
	t.Cleanup(func() { _ = c.Destruct() })
	subj := tokens.Subject{Tenant: "1234567"}
	key, lock := tokens.RecordKey(cid, subj), tokens.LockName(cid, subj)

	// An old sidecar holds its lock and is about to write a rotated token.
	if err := client.Set(ctx, legacyRecordKey(key), "old-v1", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := client.SAdd(ctx, RedisKeyPrefix+"index:"+tokens.RecordPrefix(cid), key).Err(); err != nil {
		t.Fatal(err)
	}
	if err := client.Set(ctx, legacyLockKey(lock), "old-sidecar", 10*time.Second).Err(); err != nil {
		t.Fatal(err)
	}
	loaded := make(chan string, 1)
	go func() {
		v, err := c.Records().Load(ctx, key)
		if err != nil {
			loaded <- "error: " + err.Error()
			return
		}
		loaded <- string(v)
	}()
	select {
	case v := <-loaded:
		t.Fatalf("Load answered %q while the old sidecar held the old lock", v)
	case <-time.After(300 * time.Millisecond):
	}
	// The move holds the new lock meanwhile: a new sidecar cannot start a
	// refresh of the chain either.
	if n := client.Exists(ctx, LockKey(lock)).Val(); n != 1 {
		t.Error("the move waits for the old lock without holding the new one")
	}
	client.Set(ctx, legacyRecordKey(key), "old-v2", 0) // the old sidecar's rotated token
	client.Del(ctx, legacyLockKey(lock))
	select {
	case v := <-loaded:
		if v != "old-v2" {
			t.Fatalf("Load = %q, want the token the old sidecar wrote last", v)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Load did not return once the old lock was released")
	}
	if v := client.Get(ctx, RecordKey(key)).Val(); v != "old-v2" {
		t.Errorf("the tagged key holds %q", v)
	}
	raw, _ := client.Get(ctx, legacyRecordKey(key)).Bytes()
	if _, dead := tokens.IsTombstone(raw); !dead {
		t.Errorf("the old key holds %q, want a tombstone", raw)
	}
	if client.Exists(ctx, LockKey(lock), legacyLockKey(lock)).Val() != 0 {
		t.Error("a lock of the move is still held")
	}
	// Held by this process (a refresh under the new lock): the move takes
	// only the old lock, and does not wait for itself.
	key2, lock2 := tokens.RecordKey(cid, tokens.Subject{Tenant: "7654321"}), tokens.LockName(cid, tokens.Subject{Tenant: "7654321"})
	client.Set(ctx, legacyRecordKey(key2), "old-2", 0)
	lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := c.Records().Lock(lctx, lock2); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Records().Load(lctx, key2); err != nil || string(v) != "old-2" {
		t.Errorf("Load under the new lock = %q, %v", v, err)
	}
	if err := c.Records().Unlock(ctx, lock2); err != nil {
		t.Fatal(err)
	}
	// Store retires a record the old layout holds; Delete deletes both.
	key3 := tokens.RecordKey(cid, tokens.Subject{Tenant: "1111111"})
	client.Set(ctx, legacyRecordKey(key3), "old-3", 0)
	if err := c.Records().Store(ctx, key3, []byte("new-3")); err != nil {
		t.Fatal(err)
	}
	raw, _ = client.Get(ctx, legacyRecordKey(key3)).Bytes()
	if _, dead := tokens.IsTombstone(raw); !dead {
		t.Errorf("after Store the old key holds %q, want a tombstone", raw)
	}
	client.Set(ctx, legacyRecordKey(key3), "old-3", 0)
	if err := c.Records().Delete(ctx, key3); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Records().Load(ctx, key3); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load after Delete: %v, want fs.ErrNotExist (the old key moved back?)", err)
	}
	if err := client.Get(ctx, legacyRecordKey(key3)).Err(); !errors.Is(err, redis.Nil) {
		t.Errorf("the old key after Delete: %v", err)
	}
}
