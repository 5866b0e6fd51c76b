package tokens

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"
)

// WithAccount is terr naming subj's account, so that its advice says how
// to connect that account. A copy: the error may be shared with other
// requests (a subject's last error is handed to each while it backs off).
func WithAccount(terr *Error, subj Subject) *Error {
	if subj.Account == "" || terr.Account != "" {
		return terr
	}
	named := *terr
	named.Account = subj.Account
	return &named
}

// TokenFailure says why no token could be had, and so what the app is told.
type TokenFailure int

const (
	// failNoConsent: the tenant has no usable service-account consent and no
	// refresh token to fall back on. The customer must authorize.
	FailNoConsent TokenFailure = iota + 1
	// failGrantRejected: Fortnox rejected the stored refresh token
	// (invalid_grant). The customer must authorize again.
	FailGrantRejected
	// failBadClient: Fortnox rejected the client id or secret (invalid_client).
	FailBadClient
	// failBadAnswer: the token endpoint answered something we cannot use.
	FailBadAnswer
	// failUnavailable: the token endpoint could not be reached, timed out, or
	// answered 5xx or 429.
	FailUnavailable
	// failStorage: the token store could not be read or written.
	FailStorage
	// failConsentRevoked: Fortnox told us (consent webhook) that the
	// customer revoked the integration's consent.
	FailConsentRevoked
	// failTenantMismatch: a token (from Fortnox, or read from a store)
	// names another tenant than the one it was asked for, or none where one
	// is required. It is never used.
	FailTenantMismatch
	// failRecordMisplaced: a stored record names another tenant, account
	// or client than the key it is stored under. It is never used and
	// never overwritten.
	FailRecordMisplaced
	// failAccountNotAuthorized: a named user account has no refresh token.
	FailAccountNotAuthorized
	// failUserMismatch: a named account's token is another Fortnox user's
	// than the one the account is bound to.
	FailUserMismatch
	// failRefreshInProgress: the subject's refresh token is being rotated
	// (by another sidecar, or this one's rotated record is not in the
	// store yet): the new one lands shortly. Never a 403: the chain is
	// alive.
	FailRefreshInProgress
)

// Error is what the token manager returns when it has no token for a
// tenant. It never holds a token, a refresh token or a secret: its text is
// safe for logs and for the app.
type Error struct {
	Failure TokenFailure
	// status is the token endpoint's HTTP status, 0 when there was no answer.
	Status int
	// code and description are the OAuth error fields of the answer, if any
	// (description is cut short; it is Fortnox's text, never ours).
	Code        string
	Description string
	// cause is the underlying error (transport error, parse error), if any.
	Cause error
	// retryAt is when the next attempt for this tenant will be made.
	RetryAt time.Time
	// For failTenantMismatch: the tenant asked for and the one the token
	// names ("" when it names none); detail adds what became of it (where
	// the new refresh token that came with it was kept), as a sentence.
	Tenant, TokenTenant, detail string
	// fromClientCredentials: the token came from client credentials
	// (nothing was stored; it is Fortnox's error).
	FromClientCredentials bool
	// handedOver: the token was handed over (admin API, fortnox_handover,
	// connect), not read from a stored record.
	handedOver bool
	// For failUserMismatch: the account, the user it is bound to and the
	// user the token names.
	Account, WantUser, TokenUser string
}

func (e *Error) Error() string {
	var s string
	switch e.Failure {
	case FailNoConsent:
		s = "no service-account consent for this tenant and no refresh token stored"
	case FailGrantRejected:
		s = "the stored refresh token was rejected"
	case FailBadClient:
		s = "the token endpoint rejected the client id or secret"
	case FailBadAnswer:
		s = "the token endpoint gave an answer that cannot be used"
	case FailUnavailable:
		s = "the token endpoint is unavailable"
	case FailStorage:
		s = "the token store failed"
	case FailConsentRevoked:
		s = "the customer revoked the consent"
	case FailTenantMismatch:
		s = "the token is not the tenant's"
		if e.TokenTenant != "" {
			s = fmt.Sprintf("the token is for tenant %s, not %s", e.TokenTenant, e.Tenant)
		}
	case FailRecordMisplaced:
		s = "the stored record is another tenant's"
	case FailAccountNotAuthorized:
		s = "no refresh token is stored for the account"
	case FailUserMismatch:
		s = fmt.Sprintf("the token is user %s's, but account %s is bound to user %s", e.TokenUser, e.Account, e.WantUser)
	case FailRefreshInProgress:
		s = "the refresh token is being rotated"
	default:
		s = "token error"
	}
	if e.Status != 0 {
		s += fmt.Sprintf(" (HTTP %d", e.Status)
		if e.Code != "" {
			s += " " + e.Code
		}
		if e.Description != "" {
			s += ": " + strconv.Quote(e.Description)
		}
		s += ")"
	}
	if e.Cause != nil {
		s += ": " + e.Cause.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Cause }

// HttpStatus is the status the app gets for this failure (DESIGN's table).
func (e *Error) HttpStatus() int {
	switch e.Failure {
	case FailNoConsent, FailGrantRejected, FailConsentRevoked, FailAccountNotAuthorized:
		return http.StatusForbidden
	case FailTenantMismatch, FailRecordMisplaced, FailUserMismatch:
		return http.StatusConflict
	case FailBadClient, FailBadAnswer:
		return http.StatusBadGateway
	default:
		return http.StatusServiceUnavailable
	}
}

// ErrorCode is the machine-readable "error" field of the app's answer.
func (e *Error) ErrorCode() string {
	switch e.Failure {
	case FailNoConsent:
		return "tenant_not_authorized"
	case FailGrantRejected:
		return "refresh_token_rejected"
	case FailBadClient:
		return "invalid_client_credentials"
	case FailBadAnswer:
		return "bad_token_response"
	case FailStorage:
		return "token_storage_unavailable"
	case FailConsentRevoked:
		return "consent_revoked"
	case FailTenantMismatch, FailRecordMisplaced:
		return "tenant_mismatch"
	case FailAccountNotAuthorized:
		return "account_not_authorized"
	case FailUserMismatch:
		return "account_user_mismatch"
	case FailRefreshInProgress:
		return "refresh_in_progress"
	default:
		return "token_endpoint_unavailable"
	}
}

// Advice is the "message" field: what happened and what to do.
func (e *Error) Advice(tenant string) string {
	switch e.Failure {
	case FailNoConsent:
		return "Fortnox gave no token for tenant " + tenant + ": the customer has not given this integration a service-account consent and no refresh token is stored. " +
			"Ask a system administrator of the customer to authorize the integration (authorization code flow with account_type=service), or hand a refresh token for the tenant over: " + handoverStep(tenant, "") + "."
	case FailGrantRejected:
		if e.Account != "" {
			return "Fortnox rejected the refresh token stored for account " + e.Account + " of tenant " + tenant + " (used, revoked or expired). The user must authorize again: " + e.accountRemedy(tenant)
		}
		return "Fortnox rejected the stored refresh token for tenant " + tenant + " (used or expired). The customer must authorize the integration again; then hand the new refresh token over: " + handoverStep(tenant, "") + "."
	case FailBadClient:
		return "Fortnox rejected the configured client id or client secret. Check client_id and client_secret in the fortnox block (and the environment variables or files they name)."
	case FailBadAnswer:
		return "Fortnox's token endpoint gave an answer that is not a usable token. Check token_url; if it is right, this is on Fortnox's side: try again later."
	case FailConsentRevoked:
		return "The customer (tenant " + tenant + ") revoked this integration's consent in Fortnox. The customer must authorize the integration again; requests are refused until a new consent or refresh token arrives."
	case FailTenantMismatch:
		return e.mismatchAdvice(tenant)
	case FailRecordMisplaced:
		msg := "The token store holds a record for tenant " + tenant + " that names another tenant or client"
		if e.Cause != nil {
			msg += " (" + e.Cause.Error() + ")"
		}
		return msg + ". It is never used for this tenant's requests."
	case FailAccountNotAuthorized:
		if e.Account != "" {
			return "No refresh token is stored for account " + e.Account + " of tenant " + tenant + ": " + e.accountRemedy(tenant) + " Requests without the account header use the service account."
		}
		return "No refresh token is stored for this user account of tenant " + tenant + ". Connect the user with a signed connect link (fortnox_connect, ?account=<name>&tenant=" + tenant + " signed with link_key: caddy fortnox connect-link) or hand the user's refresh token over: " + handoverStep(tenant, "<name>") + ". Requests without the account header use the service account."
	case FailUserMismatch:
		return "Fortnox's token for account " + e.Account + " of tenant " + tenant + " is user " + e.TokenUser + "'s, but the account is bound to user " + e.WantUser + ": it was not used. An operator must delete the account before another user can be connected under its name."
	case FailRefreshInProgress:
		return "The refresh token of " + e.whose(tenant) + " is being rotated (by another sidecar, or the rotated one is on its way to the token store); the new token lands shortly. Retry after the number of seconds in Retry-After."
	case FailStorage:
		if msg := recordRefusalAdvice(e.Cause, e.whose(tenant)); msg != "" {
			return msg
		}
		msg := "The token store (Caddy's storage) could not be used for tenant " + tenant
		if e.Cause != nil {
			msg += ": " + e.Cause.Error()
		}
		return msg + ". Nothing stored was changed; fix the storage or the encryption_key and retry."
	default:
		return "Fortnox's token endpoint " + e.unavailableReason() + ", and no valid token is cached for tenant " + tenant + ". " +
			e.unavailableHint() + "Retry after the number of seconds in Retry-After."
	}
}

// unavailableReason names why the token endpoint is unavailable: the HTTP
// status it answered, or the class of transport failure (DNS, connection
// refused, timeout, TLS). It names a host at most, never a URL.
func (e *Error) unavailableReason() string {
	var te *TransportError
	switch {
	case e.Status == http.StatusTooManyRequests:
		return "answered HTTP 429 (too many requests)"
	case e.Status != 0:
		return fmt.Sprintf("answered HTTP %d", e.Status)
	case errors.As(e.Cause, &te):
		return "could not be reached (" + te.Error() + ")"
	default:
		return "could not be reached or is failing"
	}
}

// unavailableHint says what the operator can check, for the failures that
// are not Fortnox's own.
func (e *Error) unavailableHint() string {
	var te *TransportError
	switch {
	case e.Status == http.StatusTooManyRequests:
		return "Fortnox is limiting token requests. "
	case e.Status != 0:
		return "This is on Fortnox's side (or a proxy in front of it). "
	case !errors.As(e.Cause, &te):
		return ""
	}
	switch te.Kind {
	case TransportDNS:
		return "Check token_url and this host's DNS resolver. "
	case TransportRefused:
		return "Check token_url, and that nothing between this host and Fortnox blocks the port. "
	case TransportTimeout:
		return "Check the network path (firewall, HTTP proxy), or raise token_timeout. "
	case TransportTLS:
		return "Check token_url, the system's CA certificates and any TLS-inspecting proxy. "
	default:
		return ""
	}
}

// mismatchAdvice explains a token that is not the tenant's: both ids, never
// a token.
func (e *Error) mismatchAdvice(tenant string) string {
	whose := "tenant " + tenant
	if e.Account != "" {
		whose = "account " + e.Account + " of tenant " + tenant
	}
	var msg string
	if e.TokenTenant != "" {
		msg = "Fortnox's token for " + whose + " is for tenant " + e.TokenTenant + ", so it was not used."
		switch {
		case e.FromClientCredentials:
		case e.Account != "":
			msg += " The account's refresh token belongs to tenant " + e.TokenTenant + "."
		case e.handedOver:
			msg += " The refresh token handed over for " + tenant + " belongs to " + e.TokenTenant + "."
		default:
			msg += " The refresh token stored for " + tenant + " belongs to " + e.TokenTenant + "."
		}
	} else {
		msg = "Fortnox's token for " + whose + " names no tenant, so it cannot be proved to be " + tenant + "'s and was not used."
		if e.Cause != nil {
			msg = "Fortnox's token for " + whose + " was not used: " + e.Cause.Error() + "."
		}
	}
	if e.detail != "" {
		msg += " " + e.detail
	}
	switch {
	case e.FromClientCredentials:
		return msg + " This is Fortnox's error (or token_url does not point at Fortnox): try again later."
	case e.Account != "":
		return msg + " The user must authorize again for tenant " + tenant + ": " + e.accountRemedy(tenant)
	}
	return msg + " Hand tenant " + tenant + "'s own refresh token over (" + handoverStep(tenant, "") + "), or have the customer authorize again."
}

// foundInRecord says whether the failure was found in a stored record (or
// in a refresh of a stored token): its subject exists, and is not a name a
// client made up.
func (e *Error) foundInRecord() bool {
	switch e.Failure {
	case FailGrantRejected, FailRecordMisplaced, FailUserMismatch, FailConsentRevoked:
		return true
	case FailTenantMismatch:
		return !e.FromClientCredentials
	case FailStorage:
		return errors.Is(e.Cause, errRecordUnreadable)
	}
	return false
}

// whose names the subject of the failure.
func (e *Error) whose(tenant string) string {
	if e.Account != "" {
		return "account " + e.Account + " of tenant " + tenant
	}
	return "tenant " + tenant
}

// accountRemedy says how a named account gets a (new) refresh-token chain.
func (e *Error) accountRemedy(tenant string) string {
	return "connect the user with a signed connect link (fortnox_connect, ?account=" + e.Account + "&tenant=" + tenant +
		" signed with link_key: caddy fortnox connect-link) or hand the user's refresh token over: " + handoverStep(tenant, e.Account) + "."
}

// handoverStep names the request that hands a refresh token over to the
// sidecar: the hand-over route on the proxy's own listener, which is the
// app's one way to do it (the admin endpoint is no place for the app).
func handoverStep(tenant, account string) string {
	path := "/tenants/" + tenant + "/refresh_token"
	if account != "" {
		path = "/tenants/" + tenant + "/accounts/" + account + "/refresh_token"
	}
	return "PUT " + path + " with {\"refresh_token\":\"…\"} on the sidecar's hand-over route (fortnox_handover)"
}

// RetryAfterSeconds is the Retry-After value for an answer given at t:
// whole seconds until the next attempt, at least 1.
func RetryAfterSeconds(retryAt, t time.Time) int {
	s := int(math.Ceil(retryAt.Sub(t).Seconds()))
	if s < 1 {
		return 1
	}
	return s
}
