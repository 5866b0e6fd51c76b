package tokens

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"go.uber.org/zap"
)

// Encrypting the records written before encryption_key was set. With the
// key set, a record found unencrypted is never served (anyone who can
// write to the store could have put it there): POST /fortnox/encrypt on
// the admin endpoint, which `caddy fortnox encrypt` calls, rewrites such
// records in place with the configured key, in Caddy's storage or in
// Redis, each under its subject's lock. Its answer holds counts and keys,
// never a token.

// unencryptedRecordError is a record stored as plain JSON while
// encryption_key is set.
type unencryptedRecordError struct{ key string }

func (e *unencryptedRecordError) Error() string {
	return fmt.Sprintf("%v: %s is not encrypted, but encryption_key is set, so it is not used (run `caddy fortnox encrypt` once to encrypt the records written before the key was set)", errRecordUnreadable, e.key)
}

func (e *unencryptedRecordError) Unwrap() error { return errRecordUnreadable }

// recordRefusalAdvice is the app's message for a record refused for what
// it holds rather than for a failing store: it names no key, path or URL.
// "" for other failures.
func recordRefusalAdvice(cause error, whose string) string {
	var other *otherTokenURLError
	var plain *unencryptedRecordError
	switch {
	case errors.As(cause, &other):
		return "The refresh token stored for " + whose + " was obtained from another token endpoint than the one this sidecar is configured with, so it is not sent. " +
			"An operator must fix the sidecar's token_url or store a new refresh token for " + whose + " (the sidecar's log names both endpoints)."
	case errors.As(cause, &plain):
		return "The token record stored for " + whose + " is not encrypted, but this sidecar encrypts its records, so it is not used. " +
			"An operator must encrypt the stored records (caddy fortnox encrypt) or store a new refresh token for " + whose + "."
	}
	return ""
}

// EncryptResult is what POST /fortnox/encrypt did. Never a token.
type EncryptResult struct {
	// Encrypted lists the keys rewritten encrypted now.
	Encrypted []string `json:"encrypted"`
	// AlreadyEncrypted counts the records that were encrypted already.
	AlreadyEncrypted int `json:"already_encrypted"`
	// Skipped lists what is not a record (tombstones of records moved to
	// Redis, keys of no known kind).
	Skipped []string `json:"skipped"`
	// Failed lists keys that could not be encrypted, each with its cause.
	Failed []string `json:"failed"`
}

// EncryptRecords rewrites every unencrypted record (and quarantine record)
// of the client with the configured key.
func (o Ops) EncryptRecords(ctx context.Context) (*EncryptResult, error) {
	m := o.m
	rs, err := o.Records()
	if err != nil {
		return nil, err
	}
	if len(rs.Keys) == 0 {
		return nil, opErrorf(OpInvalid, "no_encryption_key", "the running config has no encryption_key: set it in the fortnox block and reload (a reloaded config takes over with its first request through the fortnox handler: send one, then run this again)")
	}
	prefix := RecordPrefix(m.clientID)
	keys, err := rs.Storage.List(ctx, strings.TrimSuffix(prefix, "/"), true)
	if errors.Is(err, fs.ErrNotExist) {
		keys, err = nil, nil
	}
	if err != nil {
		return nil, opErrorf(OpUnavailable, "token_storage_unavailable", "listing the records: %v", &ScrubbedError{err})
	}
	res := &EncryptResult{Encrypted: []string{}, Skipped: []string{}, Failed: []string{}}
	for _, key := range keys {
		if !strings.HasSuffix(key, ".json") {
			continue // a folder
		}
		subj, isRecord := subjectOfKey(m.clientID, key)
		var outcome encryptOutcome
		var err error
		switch {
		case isRecord:
			err = rs.withLock(ctx, subj, func() error {
				var lerr error
				outcome, lerr = rs.encryptInPlace(ctx, key, func(plain []byte) error {
					var rec Record
					if err := json.Unmarshal(plain, &rec); err != nil {
						return fmt.Errorf("%w: %s holds no token record", errRecordUnreadable, key)
					}
					// A record copied from another key stays as it is.
					return rs.checkBinding(key, subj, &rec)
				})
				return lerr
			})
			if outcome == encryptedNow {
				m.ledger.forgetStorageFailure(subj.Key())
			}
		case strings.HasPrefix(key, quarantinePrefix(m.clientID)):
			outcome, err = rs.encryptInPlace(ctx, key, func([]byte) error { return nil })
		default:
			outcome = notARecord
		}
		switch {
		case err != nil:
			res.Failed = append(res.Failed, key+": "+err.Error())
		case outcome == encryptedNow:
			res.Encrypted = append(res.Encrypted, key)
		case outcome == wasEncrypted:
			res.AlreadyEncrypted++
		default:
			res.Skipped = append(res.Skipped, key)
		}
	}
	m.Logger().Info("unencrypted token records encrypted", zap.Int("encrypted", len(res.Encrypted)),
		zap.Int("already_encrypted", res.AlreadyEncrypted), zap.Int("skipped", len(res.Skipped)), zap.Int("failed", len(res.Failed)))
	return res, nil
}

// encryptOutcome is what encryptInPlace found.
type encryptOutcome int

const (
	notARecord encryptOutcome = iota
	wasEncrypted
	encryptedNow
)

// encryptInPlace rewrites the value at key encrypted, when it is plain
// JSON that check accepts. Its content is kept byte for byte (compacted):
// fields this version does not know are not lost.
func (rs *Records) encryptInPlace(ctx context.Context, key string, check func(plain []byte) error) (encryptOutcome, error) {
	raw, err := rs.Storage.Load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return notARecord, nil // gone meanwhile
	}
	if err != nil {
		return notARecord, storageError("loading", key, err)
	}
	if _, dead := IsTombstone(raw); dead {
		return notARecord, nil
	}
	if len(raw) > maxRecordSize {
		return notARecord, fmt.Errorf("%w: %s is larger than %d bytes", errRecordUnreadable, key, maxRecordSize)
	}
	var probe EncryptedRecord
	if err := json.Unmarshal(raw, &probe); err != nil {
		return notARecord, fmt.Errorf("%w: %s", errRecordUnreadable, describeBadJSON(key, raw))
	}
	if probe.Encrypted != "" {
		return wasEncrypted, nil
	}
	if err := check(raw); err != nil {
		return notARecord, err
	}
	sealed, err := rs.Encode(key, json.RawMessage(raw))
	if err != nil {
		return notARecord, err
	}
	if err := rs.Storage.Store(ctx, key, sealed); err != nil {
		return notARecord, storageError("writing", key, err)
	}
	return encryptedNow, nil
}

// subjectOfKey is the subject whose record is stored at key, if key is a
// record's key (recordKey's inverse).
func subjectOfKey(clientID, key string) (Subject, bool) {
	rest, ok := strings.CutPrefix(key, RecordPrefix(clientID))
	if !ok {
		return Subject{}, false
	}
	rest, ok = strings.CutSuffix(rest, ".json")
	if !ok {
		return Subject{}, false
	}
	parts := strings.Split(rest, "/")
	switch {
	case len(parts) == 1 && ValidTenantID(parts[0]):
		return Subject{Tenant: parts[0]}, true
	case len(parts) == 3 && parts[0] == "accounts" && ValidTenantID(parts[1]) && ValidAccountName(parts[2]):
		return Subject{Tenant: parts[1], Account: parts[2]}, true
	}
	return Subject{}, false
}
