package tokens

import (
	"sync"
	"time"
)

// Ledger is the one owner of what a manager remembers per subject besides
// its token (TenantState): the grant it is on, its last failure and
// backoff, an unsaved refresh token, a revoked consent, the last rejected
// token, and which failing subjects were never seen before. Every read and
// write of that state goes through its methods, under its own lock; no
// other type holds the per-subject map.
type Ledger struct {
	mu       sync.Mutex
	subjects map[string]*TenantState
	// unknownOrder lists the keys of unknown failing subjects, oldest
	// first, so that their number stays bounded.
	unknownOrder []string
}

func newLedger() *Ledger {
	return &Ledger{subjects: make(map[string]*TenantState)}
}

// stateLocked returns the subject's state, creating it. The caller holds
// l.mu.
func (l *Ledger) stateLocked(key string) *TenantState {
	st := l.subjects[key]
	if st == nil {
		st = &TenantState{}
		l.subjects[key] = st
	}
	return st
}

// update runs fn on the subject's state, created if needed, under the lock.
func (l *Ledger) update(key string, fn func(st *TenantState)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fn(l.stateLocked(key))
}

// view runs fn on the subject's state (nil: none) under the lock.
func (l *Ledger) view(key string, fn func(st *TenantState)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fn(l.subjects[key])
}

// each runs fn on every remembered subject under the lock.
func (l *Ledger) each(fn func(key string, st *TenantState)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for key, st := range l.subjects {
		fn(key, st)
	}
}

// Each calls fn with a copy of every remembered subject's state (for
// metrics and tests; fn must not call back into the ledger).
func (l *Ledger) Each(fn func(key string, st TenantState)) {
	l.each(func(key string, st *TenantState) { fn(key, *st) })
}

// Knows reports whether anything is remembered about the subject key.
func (l *Ledger) Knows(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.subjects[key] != nil
}

// Len is how many subjects are remembered.
func (l *Ledger) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.subjects)
}

// Clear forgets every subject, as a restart would (tests).
func (l *Ledger) Clear() {
	l.mu.Lock()
	defer l.mu.Unlock()
	clear(l.subjects)
	l.unknownOrder = nil
}

// forget drops everything remembered about a subject.
func (l *Ledger) forget(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.subjects, key)
}

// forgetIdle drops what is remembered about subjects with no cached token,
// unless it still matters: an unsaved refresh token, a revoked consent, or
// a recent error.
func (l *Ledger) forgetIdle(n time.Time, cached func(key string) bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for key, st := range l.subjects {
		if cached(key) || st.Unsaved != nil || st.ConsentRevoked {
			continue
		}
		keep := ForgetErrorsAfter
		if st.Unknown {
			keep = ForgetUnknownAfter
		}
		if st.LastError != nil && n.Before(st.RetryAt.Add(keep)) {
			continue
		}
		delete(l.subjects, key)
	}
	l.unknownOrder = l.unknownOrder[:0:0]
	for key, st := range l.subjects {
		if st.Unknown {
			l.unknownOrder = append(l.unknownOrder, key)
		}
	}
}

// backingOff returns the subject's last error while its backoff lasts.
func (l *Ledger) backingOff(key string, n time.Time) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.subjects[key]
	if st == nil || st.LastError == nil || !n.Before(st.RetryAt) {
		return nil
	}
	return st.LastError
}

// failure is what failed records of a subject's failure, for its log line.
type failure struct {
	named    Subject // what the log may name (see namedLocked)
	repeated bool    // the same failure as last time
	failures int     // consecutive failures
	retryAt  time.Time
}

// failed remembers a failed token request and sets the subject's next
// attempt: exponential backoff with jitter, or Fortnox's Retry-After if
// longer (terr.RetryAt is set to it). listed are the TenantIds the config
// names.
func (l *Ledger) failed(subj Subject, terr *Error, n time.Time, listed map[string]struct{}) failure {
	l.mu.Lock()
	defer l.mu.Unlock()
	key := subj.Key()
	st := l.stateLocked(key)
	var f failure
	f.named = l.namedLocked(subj, st, terr, listed)
	if st.Mode == "" && st.failures == 0 && !st.hasRefreshToken && !st.Unknown && !st.ConsentRevoked {
		l.rememberUnknownLocked(key, st)
	}
	// The same failure again is not news: logged at DEBUG, so that each
	// change of a tenant's state is logged once at its own level.
	f.repeated = st.LastError != nil && st.LastError.Failure == terr.Failure && st.LastError.Code == terr.Code
	st.failures++
	f.retryAt = n.Add(BackoffDelay(st.failures))
	if terr.RetryAt.After(f.retryAt) {
		f.retryAt = terr.RetryAt
	}
	terr.RetryAt = f.retryAt
	st.RetryAt = f.retryAt
	st.LastError = terr
	f.failures = st.failures
	return f
}

// succeeded notes a token obtained through grant.
func (l *Ledger) succeeded(key string, grant Grant) {
	l.update(key, func(st *TenantState) {
		st.Mode = grant
		st.failures, st.LastError, st.RetryAt, st.Unknown = 0, nil, time.Time{}, false
	})
}

// namedLocked is the part of subj a log line may name: a tenant (or
// account) the sidecar knows, never one a client may have made up (any
// TenantId or account name can be sent). The caller holds l.mu; st is
// subj's state, before this failure is recorded.
func (l *Ledger) namedLocked(subj Subject, st *TenantState, terr *Error, listed map[string]struct{}) Subject {
	if terr.foundInRecord() {
		return subj
	}
	known := func(st *TenantState) bool {
		return st != nil && (st.Mode != "" || st.hasRefreshToken || st.ConsentRevoked)
	}
	var named Subject
	_, isListed := listed[subj.Tenant]
	if isListed || known(l.subjects[subj.Tenant]) {
		named.Tenant = subj.Tenant
		if subj.Account != "" && known(st) {
			named.Account = subj.Account
		}
	}
	return named
}

// rememberUnknownLocked notes a subject that never had a token and now
// fails (a made-up TenantId, a customer who never connected): such states
// are forgotten sooner, and at most MaxUnknownSubjects are kept, the
// oldest going first. The caller holds l.mu.
func (l *Ledger) rememberUnknownLocked(key string, st *TenantState) {
	st.Unknown = true
	l.unknownOrder = append(l.unknownOrder, key)
	for len(l.unknownOrder) > MaxUnknownSubjects {
		oldest := l.unknownOrder[0]
		l.unknownOrder = l.unknownOrder[1:]
		if old := l.subjects[oldest]; old != nil && old.Unknown && old.Unsaved == nil && !old.ConsentRevoked {
			delete(l.subjects, oldest)
		}
	}
}

// refreshTokenFirst says whether tenant is on the refresh-token fallback
// and not yet due to try client credentials again.
func (l *Ledger) refreshTokenFirst(tenant string, n time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.subjects[tenant]
	return st != nil && st.Mode == GrantRefreshToken && n.Before(st.ccRetryAt)
}

// clientCredentialsRefused schedules the next client-credentials try (at)
// of a tenant that fell back to its refresh token.
func (l *Ledger) clientCredentialsRefused(tenant string, at time.Time) {
	l.update(tenant, func(st *TenantState) { st.ccRetryAt = at })
}

// forgetMode makes a tenant whose refresh-token record disappeared start
// over with client credentials.
func (l *Ledger) forgetMode(tenant string) {
	l.view(tenant, func(st *TenantState) {
		if st != nil {
			st.Mode, st.ccRetryAt, st.hasRefreshToken = "", time.Time{}, false
		}
	})
}

// lostRecord is forgetMode for a subject whose record is gone; it reports
// whether the subject had a refresh-token chain.
func (l *Ledger) lostRecord(key string) (had bool) {
	l.view(key, func(st *TenantState) {
		had = st != nil && (st.Mode == GrantRefreshToken || st.hasRefreshToken)
		if had {
			st.Mode, st.ccRetryAt, st.hasRefreshToken = "", time.Time{}, false
		}
	})
	return had
}

// reject remembers the access token Fortnox answered 401 to: it is never
// used again. wasRejected asks.
func (l *Ledger) reject(key, bearer string) {
	l.update(key, func(st *TenantState) { st.rejected = bearer })
}

func (l *Ledger) wasRejected(key, bearer string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.subjects[key]
	return st != nil && st.rejected == bearer
}

// found records the grant a subject's token came from without a token
// request of this process (it was found in storage).
func (l *Ledger) found(key string, grant Grant) {
	l.update(key, func(st *TenantState) {
		st.Mode, st.hasRefreshToken = grant, true
		st.failures, st.LastError, st.RetryAt, st.Unknown = 0, nil, time.Time{}, false
	})
}

// keepUnsaved holds a record whose new refresh token could not be written;
// unsaved returns it (nil: none) and saved drops it once it is written.
func (l *Ledger) keepUnsaved(key string, rec *Record) {
	l.update(key, func(st *TenantState) { st.Unsaved = rec })
}

func (l *Ledger) unsaved(key string) (rec *Record) {
	l.view(key, func(st *TenantState) {
		if st != nil {
			rec = st.Unsaved
		}
	})
	return rec
}

func (l *Ledger) saved(key string, rec *Record) {
	l.view(key, func(st *TenantState) {
		if st != nil && st.Unsaved == rec {
			st.Unsaved = nil
		}
	})
}

// forgetStorageFailure clears a subject's storage failure (the store works
// again).
func (l *Ledger) forgetStorageFailure(key string) {
	l.view(key, func(st *TenantState) {
		if st != nil && st.LastError != nil && st.LastError.Failure == FailStorage {
			st.LastError, st.failures, st.RetryAt = nil, 0, time.Time{}
		}
	})
}

// consentCreated and consentRevoked note a tenant's service-account consent
// as given or revoked (read: the stored mark need not be read again).
func (l *Ledger) consentCreated(tenant string) {
	l.update(tenant, func(st *TenantState) {
		st.ConsentRevoked, st.revocationRead = false, true
		st.LastError, st.failures, st.RetryAt, st.ccRetryAt, st.Unknown = nil, 0, time.Time{}, time.Time{}, false
		if st.Mode == GrantRefreshToken {
			st.Mode = "" // try client credentials first again
		}
	})
}

func (l *Ledger) consentRevoked(tenant string) {
	l.update(tenant, func(st *TenantState) {
		st.ConsentRevoked, st.revocationRead = true, true
		st.LastError = &Error{Failure: FailConsentRevoked}
	})
}

// revocation says whether the tenant's revocation mark was read, and
// whether its consent is revoked.
func (l *Ledger) revocation(tenant string) (read, revoked bool) {
	l.view(tenant, func(st *TenantState) {
		read = st != nil && st.revocationRead
		revoked = st != nil && st.ConsentRevoked
	})
	return read, revoked
}

// resync makes every subject read its revocation mark again and retry a
// storage failure now; it returns the remembered tenants (service
// accounts).
func (l *Ledger) resync() (tenants []string) {
	l.each(func(key string, st *TenantState) {
		st.revocationRead = false
		if st.LastError != nil && st.LastError.Failure == FailStorage {
			// The store failed because Redis did: try again now, not
			// after the backoff the outage built up.
			st.RetryAt, st.failures = time.Time{}, 0
		}
		if _, _, isAccount := cutAccount(key); !isAccount {
			tenants = append(tenants, key)
		}
	})
	return tenants
}

// revocationRead applies the tenant's stored revocation mark (revoked: the
// record says so), once per state; it returns whether the consent is
// revoked now.
func (l *Ledger) revocationRead(tenant string, revokedInRecord bool) (revoked bool) {
	l.update(tenant, func(st *TenantState) {
		if !st.revocationRead {
			st.revocationRead = true
			switch {
			case revokedInRecord:
				st.ConsentRevoked = true
				st.LastError = &Error{Failure: FailConsentRevoked}
			case st.ConsentRevoked:
				// Revoked here, but a new consent cleared the mark (a
				// broadcast this sidecar missed: resync).
				st.ConsentRevoked = false
				st.LastError, st.failures, st.RetryAt = nil, 0, time.Time{}
			}
		}
		revoked = st.ConsentRevoked
	})
	return revoked
}

// recovered notes a new refresh token for the subject: its failure is
// forgotten, and a tenant's consent counts as given again.
func (l *Ledger) recovered(subj Subject) {
	l.update(subj.Key(), func(st *TenantState) {
		st.hasRefreshToken = true
		st.LastError, st.failures, st.RetryAt, st.Unknown, st.rejected = nil, 0, time.Time{}, false, ""
		if subj.Account == "" {
			st.ConsentRevoked, st.revocationRead = false, true
		}
		if st.Mode == "" || subj.Account != "" {
			st.Mode = GrantRefreshToken
		}
	})
}

// sharedFound notes a token another sidecar obtained through grant; for a
// tenant's refresh token, client credentials are not tried again before
// ccRetryAt.
func (l *Ledger) sharedFound(subj Subject, grant Grant, ccRetryAt time.Time) {
	l.update(subj.Key(), func(st *TenantState) {
		st.Mode = grant
		st.failures, st.LastError, st.RetryAt, st.Unknown = 0, nil, time.Time{}, false
		if grant == GrantRefreshToken && subj.Account == "" {
			// Another sidecar found that the tenant has no service-account
			// consent: do not ask again before retry_client_credentials.
			st.hasRefreshToken = true
			st.ccRetryAt = ccRetryAt
		}
	})
}
