package redisstate

import (
	"strings"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
)

// The key layout. Every key of one (client id, tenant) carries one hash
// tag, {fortnox/<client id>/<tenant>}, so that in a Redis Cluster they
// live in one slot and a tenant's scripts and pipelines never cross
// slots:
//
//	caddy-fortnox:record:{fortnox/<cid>/<tenant>}:<storage key>   a token record (tokens.RecordKey)
//	caddy-fortnox:lock:{fortnox/<cid>/<tenant>}:<lock name>       a storage lock (tokens.LockName, …/token)
//	caddy-fortnox:turns:{fortnox/<cid>/<tenant>}                  the rate budget's log (+ :pause, :generation)
//	caddy-fortnox:token:{fortnox/<cid>/<tenant>}:<subject>        a shared access token
//	caddy-fortnox:invalidations:{fortnox/<cid>/<tenant>}:<subject> 401-invalidations of the last window
//	caddy-fortnox:event:{fortnox/<cid>/<tenant>}                  the newest event time
//
// Client-wide keys are each used alone (no script or MULTI combines them
// with another key), so they work in a Cluster wherever their slot is:
//
//	caddy-fortnox:index:fortnox/<cid>/     the record index (a set of storage keys)
//	caddy-fortnox:events:fortnox/<cid>/    the events channel (PUBLISH reaches every node)
//	caddy-fortnox:sidecars:fortnox/<cid>/  the registry of live sidecars
//	caddy-fortnox:slots:fortnox/<cid>/     the token-request slots
//	caddy-fortnox:used:…, :result:…        connect flows
//	caddy-fortnox:notify:{fortnox/<cid>/}:… notifications (one tag of their own, see Notes)
//
// Records and locks had no tag before (caddy-fortnox:record:<storage key>,
// caddy-fortnox:lock:<lock name>): see legacyRecordKey and
// Records.moveLegacy for how a record moves.

// TenantTag is the hash tag of a (client id, tenant)'s keys, braces
// included.
func TenantTag(clientID, tenant string) string {
	return "{" + tokens.RecordPrefix(clientID) + tenant + "}"
}

// tagOf is the hash tag of a storage key or lock name:
// fortnox/<cid>/<tenant>.json, fortnox/<cid>/accounts/<tenant>/<a>.json,
// fortnox/<cid>/<tenant>[/accounts/<a>][/token], and a companion key
// fortnox/<cid>/<tenant>.<anything>, all belong to <tenant>.
// Any other name (a quarantined record, a name outside the layout) is its
// own tag.
func tagOf(name string) string {
	parts := strings.SplitN(name, "/", 5)
	if len(parts) >= 3 && parts[0] == "fortnox" && parts[1] != "" {
		t := parts[2]
		if t == "accounts" && len(parts) >= 4 {
			t = parts[3]
		}
		// A tenant id is digits: what follows a dot is the kind of key
		// (.json, or a companion such as a mark beside the record).
		t, _, _ = strings.Cut(t, ".")
		if t != "" && t != "quarantine" && !strings.ContainsAny(t, "{}") {
			return "{fortnox/" + parts[1] + "/" + t + "}"
		}
	}
	return "{" + strings.NewReplacer("{", "%7B", "}", "%7D").Replace(name) + "}"
}

// RecordKey is the Redis key of a storage key's record.
func RecordKey(storageKey string) string {
	return RedisKeyPrefix + "record:" + tagOf(storageKey) + ":" + storageKey
}

// LockKey is the Redis key of a storage lock.
func LockKey(name string) string { return RedisKeyPrefix + "lock:" + tagOf(name) + ":" + name }

// TurnsKey is a (client id, tenant)'s rate-budget log; its pause and
// generation are this + ":pause", ":generation".
func TurnsKey(clientID, tenant string) string {
	return RedisKeyPrefix + "turns:" + TenantTag(clientID, tenant)
}

// TokenKey is a subject's shared access token.
func TokenKey(clientID string, subj tokens.Subject) string {
	return RedisKeyPrefix + "token:" + TenantTag(clientID, subj.Tenant) + ":" + subj.Key()
}

// legacyRecordKey and legacyLockKey are a record's and a lock's keys
// before the hash tags: sidecars of earlier versions use them.
func legacyRecordKey(storageKey string) string { return RedisKeyPrefix + "record:" + storageKey }
func legacyLockKey(name string) string         { return RedisKeyPrefix + "lock:" + name }

// lockOfRecord is the lock name that guards a record's refresh token
// (tokens.LockName), "" for a key outside the layout.
func lockOfRecord(storageKey string) string {
	rest, ok := strings.CutSuffix(storageKey, ".json")
	parts := strings.Split(rest, "/")
	if !ok || len(parts) < 3 || parts[0] != "fortnox" {
		return ""
	}
	switch {
	case len(parts) == 3 && parts[2] != "quarantine":
		return rest
	case len(parts) == 5 && parts[2] == "accounts":
		return "fortnox/" + parts[1] + "/" + parts[3] + "/accounts/" + parts[4]
	}
	return ""
}
