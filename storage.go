package fortnox

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
)

// tokenRecord is what Caddy's storage holds for one (client id, tenant):
// the refresh token (the only copy of a single-use secret), and the access
// token with its times, so that another replica or a restarted process can
// use it instead of refreshing again.
type tokenRecord struct {
	Tenant       string    `json:"tenant"`
	ClientID     string    `json:"client_id"`
	Mode         string    `json:"mode,omitempty"`
	RefreshToken string    `json:"refresh_token,omitempty"`
	AccessToken  string    `json:"access_token,omitempty"`
	IssuedAt     time.Time `json:"issued_at,omitzero"`
	ExpiresAt    time.Time `json:"expires_at,omitzero"`
	// RejectedAt is set when Fortnox rejected RefreshToken (invalid_grant):
	// no replica tries it again; a new refresh token clears it.
	RejectedAt time.Time `json:"rejected_at,omitzero"`
	UpdatedAt  time.Time `json:"updated_at"`
}

// maxRecordSize bounds what is read back from storage.
const maxRecordSize = 64 << 10

// errRecordLocked is a stored record this process cannot read (encrypted
// with another key, or with none configured). It is never overwritten.
var errRecordUnreadable = errors.New("stored token record cannot be read")

// recordKey is where a tenant's record lives in Caddy's storage.
func recordKey(clientID, tenant string) string {
	return recordPrefix(clientID) + tenant + ".json"
}

func recordPrefix(clientID string) string {
	return "fortnox/" + url.PathEscape(clientID) + "/"
}

// lockName is the storage lock that serializes refreshes of a tenant's
// refresh token across processes.
func lockName(clientID, tenant string) string {
	return "fortnox/" + url.PathEscape(clientID) + "/" + tenant
}

// recordStore reads and writes token records in Caddy's storage,
// encrypting them when a key is configured.
type recordStore struct {
	storage  certmagic.Storage
	clientID string
	aead     cipher.AEAD // nil: records are stored as plain JSON
}

// encryptedRecord is the stored form of an encrypted record.
type encryptedRecord struct {
	Encrypted string `json:"encrypted"` // the algorithm: "AES-256-GCM"
	Data      string `json:"data"`      // base64(nonce || ciphertext)
}

const encryptionAlgorithm = "AES-256-GCM"

// parseEncryptionKey reads a 32-byte key given as base64 (standard or URL
// alphabet, padded or not) or as 64 hex characters.
func parseEncryptionKey(s string) (cipher.AEAD, error) {
	s = strings.TrimSpace(s)
	var key []byte
	if b, err := hex.DecodeString(s); err == nil && len(b) == 32 {
		key = b
	} else {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
			if b, err := enc.DecodeString(s); err == nil && len(b) == 32 {
				key = b
				break
			}
		}
	}
	if key == nil {
		return nil, errors.New("encryption_key must be 32 random bytes, written as base64 (e.g. the output of `openssl rand -base64 32`) or as 64 hex characters")
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// load returns the tenant's record, or nil when there is none.
func (rs *recordStore) load(ctx context.Context, tenant string) (*tokenRecord, error) {
	key := recordKey(rs.clientID, tenant)
	raw, err := rs.storage.Load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("loading the token record: %w", err)
	}
	return rs.decode(key, raw)
}

// loadOrNew returns the tenant's record, or a new refresh-token record.
func (rs *recordStore) loadOrNew(ctx context.Context, tenant string) (*tokenRecord, error) {
	rec, err := rs.load(ctx, tenant)
	if err == nil && rec == nil {
		rec = &tokenRecord{Tenant: tenant, Mode: grantRefreshToken}
	}
	return rec, err
}

// decode reads a stored record. Records written before encryption_key was
// set are read as they are (and encrypted on their next write).
func (rs *recordStore) decode(key string, raw []byte) (*tokenRecord, error) {
	if len(raw) > maxRecordSize {
		return nil, fmt.Errorf("%w: %s is larger than %d bytes", errRecordUnreadable, key, maxRecordSize)
	}
	var probe struct {
		encryptedRecord
		Tenant *string `json:"tenant"`
	}
	if err := json.Unmarshal(raw, &probe); err != nil {
		return nil, fmt.Errorf("%w: %s is not JSON", errRecordUnreadable, key)
	}
	plain := raw
	if probe.Encrypted != "" {
		if probe.Encrypted != encryptionAlgorithm {
			return nil, fmt.Errorf("%w: %s is encrypted with %q, which this version does not know", errRecordUnreadable, key, probe.Encrypted)
		}
		if rs.aead == nil {
			return nil, fmt.Errorf("%w: %s is encrypted, but no encryption_key is configured", errRecordUnreadable, key)
		}
		sealed, err := base64.StdEncoding.DecodeString(probe.Data)
		ns := rs.aead.NonceSize()
		if err != nil || len(sealed) < ns {
			return nil, fmt.Errorf("%w: %s is damaged", errRecordUnreadable, key)
		}
		plain, err = rs.aead.Open(nil, sealed[:ns], sealed[ns:], []byte(key))
		if err != nil {
			return nil, fmt.Errorf("%w: %s cannot be decrypted: encryption_key is not the key it was written with", errRecordUnreadable, key)
		}
	}
	var rec tokenRecord
	if err := json.Unmarshal(plain, &rec); err != nil {
		return nil, fmt.Errorf("%w: %s holds no token record", errRecordUnreadable, key)
	}
	return &rec, nil
}

// save writes the tenant's record.
func (rs *recordStore) save(ctx context.Context, rec *tokenRecord) error {
	key := recordKey(rs.clientID, rec.Tenant)
	rec.ClientID = rs.clientID
	rec.UpdatedAt = now().UTC()
	raw, err := rs.encode(key, rec)
	if err != nil {
		return err
	}
	return rs.storage.Store(ctx, key, raw)
}

func (rs *recordStore) encode(key string, rec *tokenRecord) ([]byte, error) {
	plain, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	if rs.aead == nil {
		return plain, nil
	}
	nonce := make([]byte, rs.aead.NonceSize(), rs.aead.NonceSize()+len(plain)+rs.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	sealed := rs.aead.Seal(nonce, nonce, plain, []byte(key))
	return json.Marshal(encryptedRecord{Encrypted: encryptionAlgorithm, Data: base64.StdEncoding.EncodeToString(sealed)})
}

// saveHard writes a record that holds a new refresh token: the old one is
// dead, so this copy is the only one. It tries a few times before giving up.
func (rs *recordStore) saveHard(ctx context.Context, rec *tokenRecord) error {
	var err error
	for attempt, pause := 0, 100*time.Millisecond; attempt < 4; attempt, pause = attempt+1, pause*3 {
		if err = rs.save(ctx, rec); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(pause):
		}
	}
	return err
}

// tenants lists the tenants that have a record.
func (rs *recordStore) tenants(ctx context.Context) ([]string, error) {
	keys, err := rs.storage.List(ctx, strings.TrimSuffix(recordPrefix(rs.clientID), "/"), false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, k := range keys {
		name := k[strings.LastIndexByte(k, '/')+1:]
		if tenant, ok := strings.CutSuffix(name, ".json"); ok && validTenantID(tenant) {
			out = append(out, tenant)
		}
	}
	return out, nil
}

// withLock runs fn while holding the tenant's storage lock.
func (rs *recordStore) withLock(ctx context.Context, tenant string, fn func() error) error {
	name := lockName(rs.clientID, tenant)
	if err := rs.storage.Lock(ctx, name); err != nil {
		return fmt.Errorf("taking the storage lock: %w", err)
	}
	defer func() {
		// Unlock even when ctx is done: a lock left behind stalls the
		// other replicas until it goes stale.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = rs.storage.Unlock(uctx, name)
	}()
	return fn()
}
