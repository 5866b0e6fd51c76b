package tokens

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
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
)

// Tombstone is what a record moved to Redis leaves in Caddy's storage, so
// that a sidecar still without `redis` (a rolling upgrade) refuses clearly
// instead of spending a dead refresh token.
type Tombstone struct {
	Tenant   string    `json:"tenant,omitempty"`
	ClientID string    `json:"client_id,omitempty"`
	MovedTo  string    `json:"moved_to"`
	MovedAt  time.Time `json:"moved_at"`
}

// IsTombstone says whether a stored value is a tombstone.
func IsTombstone(raw []byte) (*Tombstone, bool) {
	var t Tombstone
	if json.Unmarshal(raw, &t) != nil || t.MovedTo == "" {
		return nil, false
	}
	return &t, true
}

// Migrating is a shared store that takes records over from Caddy's
// storage (cluster mode's record storage).
type Migrating interface {
	Storage
	// sharedRecords is the shared store; oldRecords Caddy's storage (nil:
	// none).
	SharedRecords() Storage
	OldRecords() Storage
	StoreIfAbsent(ctx context.Context, key string, value []byte) (bool, error)
}

// Record is what the store holds for one subject (a tenant's service
// account, or a named user account of a tenant) of one client id: the
// refresh token (the only copy of a single-use secret), and the access
// token with its times, so that another replica or a restarted process can
// use it instead of refreshing again.
//
// Tenant, ClientID and Account name whose record it is. They are written
// from the key the record is stored under, and checked against that key
// when it is read: a record found under another key is never used and
// never overwritten (see errRecordMisplaced).
type Record struct {
	Tenant       string    `json:"tenant"`
	ClientID     string    `json:"client_id"`
	Account      string    `json:"account,omitempty"`
	Mode         Grant     `json:"mode,omitempty"`
	RefreshToken string    `json:"refresh_token,omitempty"`
	AccessToken  string    `json:"access_token,omitempty"`
	IssuedAt     time.Time `json:"issued_at,omitzero"`
	ExpiresAt    time.Time `json:"expires_at,omitzero"`
	// RefreshTokenAt is when RefreshToken was issued (or stored, for one
	// handed over through the admin API): Fortnox's refresh tokens die
	// after 45 days unused.
	RefreshTokenAt time.Time `json:"refresh_token_at,omitzero"`
	// UserID is the userId claim of the account's tokens: it binds a named
	// account to one Fortnox user.
	UserID string `json:"user_id,omitempty"`
	// RejectedAt is set when Fortnox rejected RefreshToken (invalid_grant):
	// no replica tries it again; a new refresh token clears it.
	RejectedAt time.Time `json:"rejected_at,omitzero"`
	// MismatchTenant is set when the refresh token stored here turned out to
	// belong to another tenant: the new refresh token Fortnox returned went
	// to the quarantine, and this record holds none.
	MismatchTenant string    `json:"mismatch_tenant,omitempty"`
	MismatchAt     time.Time `json:"mismatch_at,omitzero"`
	// ConsentRevokedAt is set when the customer revoked the service-account
	// consent (webhook): the tenant's service account is refused, also
	// after a restart, until a new consent or refresh token arrives.
	ConsentRevokedAt time.Time `json:"consent_revoked_at,omitzero"`
	// TokenURL is the token endpoint the refresh token was obtained from:
	// it is sent nowhere else (see otherTokenURLError). A record written
	// before records carried it takes the configured token_url on its next
	// write.
	TokenURL string `json:"token_url,omitempty"`
	// RotatingBy marks a rotation in flight: the holder (a random id of
	// one sidecar's manager) wrote it under the record's lock before it
	// sent RefreshToken to Fortnox, since RotatingSince, and renews
	// RotatingRenewed while its request is pending. The write of the
	// rotated record clears it. While it is live, no other sidecar spends
	// RefreshToken (see rotationInFlight).
	RotatingBy      string    `json:"rotating_by,omitempty"`
	RotatingSince   time.Time `json:"rotating_since,omitzero"`
	RotatingRenewed time.Time `json:"rotating_renewed,omitzero"`
	UpdatedAt       time.Time `json:"updated_at"`
}

// clearMark removes the in-flight mark.
func (r *Record) clearMark() {
	r.RotatingBy, r.RotatingSince, r.RotatingRenewed = "", time.Time{}, time.Time{}
}

// liveRefreshToken says whether the record holds a refresh token that may
// still work.
func (r *Record) liveRefreshToken() bool {
	return r != nil && r.RefreshToken != "" && r.RejectedAt.IsZero()
}

// maxRecordSize bounds what is read back from storage.
const maxRecordSize = 64 << 10

// errRecordUnreadable is a stored record this process cannot read
// (encrypted with another key, with none configured, damaged). It is never
// overwritten.
var errRecordUnreadable = errors.New("stored token record cannot be read")

// errRecordMisplaced is a stored record whose content names another tenant,
// account or client than the key it was found under (it was copied there).
// It is never used and never overwritten.
var errRecordMisplaced = errors.New("stored token record belongs elsewhere")

// misplacedRecordError says whose record was found where.
type misplacedRecordError struct {
	key                  string
	wantTenant, tenant   string
	wantClient, client   string
	wantAccount, account string
}

func (e *misplacedRecordError) Error() string {
	var what string
	switch {
	case e.tenant != e.wantTenant:
		what = fmt.Sprintf("tenant %s, not %s", e.tenant, e.wantTenant)
	case e.client != e.wantClient:
		what = fmt.Sprintf("client id %q, not %q", e.client, e.wantClient)
	default:
		what = fmt.Sprintf("account %q, not %q", e.account, e.wantAccount)
	}
	return fmt.Sprintf("%v: the record at %s names %s; it was copied there from another key, so it is not used and not overwritten (move it back, or delete it and store the tenant's refresh token again)", errRecordMisplaced, e.key, what)
}

func (e *misplacedRecordError) Unwrap() error { return errRecordMisplaced }

// otherTokenURLError is a record whose refresh token was obtained from
// another token endpoint than the configured token_url: it is never sent
// to this one (a changed token_url must not carry customers' refresh
// tokens to a listener of someone else's), and the record is never
// overwritten. Its text names no URL (it may reach the app); the log line
// of the refusal names both (see recordFailure).
type otherTokenURLError struct {
	key                  string
	recorded, configured string
}

func (e *otherTokenURLError) Error() string {
	return fmt.Sprintf("%v: %s was obtained from another token endpoint than the configured token_url, and a refresh token is sent only to the endpoint it came from; it is not used and not overwritten (set token_url back, or delete the record and store a refresh token from the configured endpoint)", errRecordUnreadable, e.key)
}

func (e *otherTokenURLError) Unwrap() error { return errRecordUnreadable }

// RecordKey is where a record lives in the store.
func RecordKey(clientID string, id Subject) string {
	if id.Account == "" {
		return RecordPrefix(clientID) + id.Tenant + ".json"
	}
	return RecordPrefix(clientID) + "accounts/" + id.Tenant + "/" + id.Account + ".json"
}

func RecordPrefix(clientID string) string {
	return "fortnox/" + url.PathEscape(clientID) + "/"
}

// quarantinePrefix is where refresh tokens that could not be stored under
// their tenant are kept (see quarantine).
func quarantinePrefix(clientID string) string {
	return RecordPrefix(clientID) + "quarantine/"
}

// LockName is the storage lock that serializes refreshes of a record's
// refresh token across processes.
func LockName(clientID string, id Subject) string {
	name := "fortnox/" + url.PathEscape(clientID) + "/" + id.Tenant
	if id.Account != "" {
		name += "/accounts/" + id.Account
	}
	return name
}

// Storage is where records live: Caddy's storage (certmagic.Storage
// satisfies it), or Redis in cluster mode. Load answers fs.ErrNotExist
// for a missing key.
type Storage interface {
	Store(ctx context.Context, key string, value []byte) error
	Load(ctx context.Context, key string) ([]byte, error)
	Delete(ctx context.Context, key string) error
	List(ctx context.Context, path string, recursive bool) ([]string, error)
	Lock(ctx context.Context, name string) error
	Unlock(ctx context.Context, name string) error
}

// Records reads and writes token records, encrypting them when a key
// is configured.
type Records struct {
	// Clock stamps what is saved (nil: real time).
	Clock    *clock.Clock
	Storage  Storage
	ClientID string
	// tokenURL is the configured token endpoint: records are stamped with
	// it when written, and one stamped with another is refused when read.
	// Empty: not checked (unit tests).
	TokenURL string
	// keys: the first encrypts what is written; all of them are tried on
	// what is read (older keys, while a store moves to a new one). Empty:
	// records are stored as plain JSON.
	Keys []cipher.AEAD
}

// EncryptedRecord is the stored form of an encrypted record.
type EncryptedRecord struct {
	Encrypted string `json:"encrypted"` // the algorithm: "AES-256-GCM"
	Data      string `json:"data"`      // base64(nonce || ciphertext)
}

const EncryptionAlgorithm = "AES-256-GCM"

// ParseEncryptionKey reads a 32-byte key given as base64 (standard or URL
// alphabet, padded or not) or as 64 hex characters.
func ParseEncryptionKey(s string) (cipher.AEAD, error) {
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

// load returns a record, or nil when there is none.
func (rs *Records) load(ctx context.Context, id Subject) (*Record, error) {
	key := RecordKey(rs.ClientID, id)
	raw, err := rs.Storage.Load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, storageError("loading", key, err)
	}
	if t, dead := IsTombstone(raw); dead {
		return nil, fmt.Errorf("%w: the tokens of %s moved to %s (cluster mode) on %s, and this sidecar has no `redis` line: add the same `redis <url>` to its fortnox block (or copy the records back with `caddy fortnox export`)",
			errRecordUnreadable, key, strings.ToUpper(t.MovedTo[:1])+t.MovedTo[1:], t.MovedAt.Format(time.RFC3339))
	}
	rec, err := rs.Decode(key, raw)
	if err != nil {
		var plain *unencryptedRecordError
		if errors.As(err, &plain) {
			metrics.UnencryptedRecords.Inc()
		}
		return nil, err
	}
	if err := rs.checkBinding(key, id, rec); err != nil {
		return nil, err
	}
	if rec.TokenURL != "" && rs.TokenURL != "" && rec.TokenURL != rs.TokenURL {
		return nil, &otherTokenURLError{key: key, recorded: rec.TokenURL, configured: rs.TokenURL}
	}
	return rec, nil
}

// checkBinding refuses a record whose content names another tenant,
// account or client than its key. Encrypted records are bound to their key
// by the cipher as well; this catches plain ones copied by hand.
func (rs *Records) checkBinding(key string, id Subject, rec *Record) error {
	tenantOK := rec.Tenant == "" || rec.Tenant == id.Tenant
	clientOK := rec.ClientID == "" || rec.ClientID == rs.ClientID
	if tenantOK && clientOK && rec.Account == id.Account {
		return nil
	}
	return &misplacedRecordError{
		key:        key,
		wantTenant: id.Tenant, tenant: CmpOr(rec.Tenant, id.Tenant),
		wantClient: rs.ClientID, client: CmpOr(rec.ClientID, rs.ClientID),
		wantAccount: id.Account, account: rec.Account,
	}
}

func CmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// loadOrNew returns a record, or a new refresh-token record for id.
func (rs *Records) loadOrNew(ctx context.Context, id Subject) (*Record, error) {
	rec, err := rs.load(ctx, id)
	if err == nil && rec == nil {
		rec = &Record{Tenant: id.Tenant, Account: id.Account, Mode: GrantRefreshToken}
	}
	return rec, err
}

// Decode reads a stored record. With encryption_key set, a plain one is
// refused (unencryptedRecordError).
func (rs *Records) Decode(key string, raw []byte) (*Record, error) {
	plain, err := rs.Plain(key, raw)
	if err != nil {
		return nil, err
	}
	var rec Record
	if err := json.Unmarshal(plain, &rec); err != nil {
		return nil, fmt.Errorf("%w: %s holds no token record", errRecordUnreadable, key)
	}
	return &rec, nil
}

// Plain returns the JSON of a stored value, decrypted when it is encrypted.
func (rs *Records) Plain(key string, raw []byte) ([]byte, error) {
	if len(raw) > maxRecordSize {
		return nil, fmt.Errorf("%w: %s is larger than %d bytes", errRecordUnreadable, key, maxRecordSize)
	}
	var probe EncryptedRecord
	if err := json.Unmarshal(raw, &probe); err != nil {
		return nil, fmt.Errorf("%w: %s", errRecordUnreadable, describeBadJSON(key, raw))
	}
	if probe.Encrypted == "" {
		if len(rs.Keys) > 0 {
			// With a key set, a plain record is one nobody encrypted:
			// written before the key (`caddy fortnox encrypt` rewrites
			// those), or put there by someone who can write to the store.
			return nil, &unencryptedRecordError{key: key}
		}
		return raw, nil
	}
	return rs.open(key, probe)
}

// describeBadJSON tells a record cut short (a write that did not finish,
// a full disk) from one that is not JSON at all.
func describeBadJSON(key string, raw []byte) string {
	trimmed := strings.TrimSpace(string(raw))
	err := json.Unmarshal([]byte(trimmed), new(any))
	switch {
	case trimmed == "":
		return key + " is empty: the write that made it did not finish (a full disk?); restore it from a backup, or delete it and store the refresh token again"
	case err != nil && strings.HasPrefix(trimmed, "{") && strings.Contains(err.Error(), "unexpected end of JSON input"):
		return key + " is truncated (its JSON ends early): the write that made it did not finish (a full disk?); restore it from a backup, or delete it and store the refresh token again"
	}
	return key + " is not JSON: it was not written by this plugin; delete it, or restore it from a backup"
}

// open decrypts an encrypted record with the first key that fits.
func (rs *Records) open(key string, er EncryptedRecord) ([]byte, error) {
	if er.Encrypted != EncryptionAlgorithm {
		return nil, fmt.Errorf("%w: %s is encrypted with %q, which this version does not know", errRecordUnreadable, key, er.Encrypted)
	}
	if len(rs.Keys) == 0 {
		return nil, fmt.Errorf("%w: %s is encrypted, but no encryption_key is configured", errRecordUnreadable, key)
	}
	sealed, err := base64.StdEncoding.DecodeString(er.Data)
	if err != nil || len(sealed) < rs.Keys[0].NonceSize() {
		return nil, fmt.Errorf("%w: %s is damaged", errRecordUnreadable, key)
	}
	for _, aead := range rs.Keys {
		ns := aead.NonceSize()
		if plain, err := aead.Open(nil, sealed[:ns], sealed[ns:], []byte(key)); err == nil {
			return plain, nil
		}
	}
	return nil, fmt.Errorf("%w: %s cannot be decrypted: encryption_key is not the key it was written with (list the old key after the new one to read it: encryption_key <new> <old>)", errRecordUnreadable, key)
}

// save writes a record under id. The key decides whose record it is: the
// record's own fields are set from it.
func (rs *Records) save(ctx context.Context, id Subject, rec *Record) error {
	key := RecordKey(rs.ClientID, id)
	rec.Tenant, rec.Account, rec.ClientID = id.Tenant, id.Account, rs.ClientID
	if rs.TokenURL != "" {
		// A record read with another token URL is refused (load), so what
		// is written here was obtained from the configured one.
		rec.TokenURL = rs.TokenURL
	}
	rec.UpdatedAt = rs.Clock.Now().UTC()
	raw, err := rs.Encode(key, rec)
	if err != nil {
		return err
	}
	if err := rs.Storage.Store(ctx, key, raw); err != nil {
		return storageError("writing", key, err)
	}
	return nil
}

func (rs *Records) Encode(key string, rec any) ([]byte, error) {
	plain, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	if len(rs.Keys) == 0 {
		return plain, nil
	}
	aead := rs.Keys[0]
	nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(plain)+aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	sealed := aead.Seal(nonce, nonce, plain, []byte(key))
	return json.Marshal(EncryptedRecord{Encrypted: EncryptionAlgorithm, Data: base64.StdEncoding.EncodeToString(sealed)})
}

// saveHard writes a record that holds a new refresh token: the old one is
// dead, so this copy is the only one. It tries a few times before giving
// up, and is not cut short by ctx: a write that has started finishes.
func (rs *Records) saveHard(ctx context.Context, id Subject, rec *Record) error {
	ctx = context.WithoutCancel(ctx)
	var err error
	for attempt, pause := 0, 100*time.Millisecond; attempt < 4; attempt, pause = attempt+1, pause*3 {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err = rs.save(wctx, id, rec)
		cancel()
		if err == nil {
			return nil
		}
		time.Sleep(pause)
	}
	return err
}

// tenants lists the tenants that have a service-account record.
func (rs *Records) tenants(ctx context.Context) ([]string, error) {
	return rs.names(ctx, strings.TrimSuffix(RecordPrefix(rs.ClientID), "/"), ".json", ValidTenantID)
}

// accounts lists the named accounts stored for tenant.
func (rs *Records) accounts(ctx context.Context, tenant string) ([]string, error) {
	return rs.names(ctx, RecordPrefix(rs.ClientID)+"accounts/"+tenant, ".json", ValidAccountName)
}

// accountTenants lists the tenants that have named accounts stored.
func (rs *Records) accountTenants(ctx context.Context) ([]string, error) {
	return rs.names(ctx, RecordPrefix(rs.ClientID)+"accounts", "", ValidTenantID)
}

// subjects lists every subject with a record: tenants' service accounts,
// then named accounts.
func (rs *Records) subjects(ctx context.Context) ([]Subject, error) {
	tenants, err := rs.tenants(ctx)
	if err != nil {
		return nil, err
	}
	var out []Subject
	for _, t := range tenants {
		out = append(out, Subject{Tenant: t})
	}
	accountTenants, err := rs.accountTenants(ctx)
	if err != nil {
		return nil, err
	}
	for _, t := range accountTenants {
		names, err := rs.accounts(ctx, t)
		if err != nil {
			return nil, err
		}
		for _, name := range names {
			out = append(out, Subject{Tenant: t, Account: name})
		}
	}
	return out, nil
}

// names lists what is directly in dir: the last part of each key, less
// suffix (keys without it are left out), kept when valid says so. A
// missing dir holds nothing.
func (rs *Records) names(ctx context.Context, dir, suffix string, valid func(string) bool) ([]string, error) {
	keys, err := rs.Storage.List(ctx, dir, false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, storageError("listing", dir, err)
	}
	var out []string
	for _, k := range keys {
		if name, ok := strings.CutSuffix(k[strings.LastIndexByte(k, '/')+1:], suffix); ok && valid(name) {
			out = append(out, name)
		}
	}
	return out, nil
}

// withLock runs fn while holding the record's storage lock.
func (rs *Records) withLock(ctx context.Context, id Subject, fn func() error) error {
	name := LockName(rs.ClientID, id)
	if err := rs.Storage.Lock(ctx, name); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("taking the storage lock for %s: another process held it too long", id)
		}
		return storageError("taking the lock", name, err)
	}
	defer func() {
		// Unlock even when ctx is done: a lock left behind stalls the
		// other replicas until it goes stale.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = rs.Storage.Unlock(uctx, name)
	}()
	return fn()
}

// absolutePath matches what looks like an absolute file path in an error.
var absolutePath = regexp.MustCompile(`(^|[\s"'(=:])(/[^\s"':),]+)`)

// storageError describes a storage failure without the absolute paths a
// file system error carries (they would reach the app's 503 and the admin
// API's answers): the key, the operation and the cause are enough.
func storageError(op, key string, err error) error {
	return fmt.Errorf("%s %s in the token store: %w", op, key, &ScrubbedError{err})
}

// ScrubbedError is an error whose text has no absolute path; errors.Is
// and errors.As still reach the original.
type ScrubbedError struct{ Err error }

func (e *ScrubbedError) Unwrap() error { return e.Err }

func (e *ScrubbedError) Error() string {
	var pe *fs.PathError
	if errors.As(e.Err, &pe) {
		return pe.Op + ": " + pe.Err.Error()
	}
	var le *os.LinkError
	if errors.As(e.Err, &le) {
		return le.Op + ": " + le.Err.Error()
	}
	return absolutePath.ReplaceAllString(e.Err.Error(), "$1<path>")
}
