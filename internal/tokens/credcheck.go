package tokens

import (
	"context"
	"crypto/sha256"
	"errors"
	"sync"
	"time"

	"go.uber.org/zap"
)

// The credential check: shortly after a token manager starts, one token
// request tells the operator whether Fortnox accepts the client id and
// secret, before any app request depends on them. It mints nothing: it is a
// refresh grant with a refresh token that cannot exist, which Fortnox
// refuses with invalid_client when the credentials are wrong and with
// invalid_grant when they are right.
//
// It never runs in Provision: `caddy validate` and `caddy adapt --validate`
// provision and clean up at once, destroying the manager, and the check
// waits credCheckDelay under the manager's context, so they never touch the
// network.

// CredCheckDelay is how long after Provision the check is made.
var CredCheckDelay = 1500 * time.Millisecond

// credCheckRefreshToken is the refresh token the check sends: not a token
// Fortnox can have issued (those are 40 hex characters).
const credCheckRefreshToken = "caddy-fortnox-credential-check"

// CredChecked holds, for each live token manager, a fingerprint of the
// credentials last checked, so that each manager checks them once (and
// again only when a reload changes them).
var CredChecked sync.Map // *Manager -> [sha256.Size]byte

// CheckCredentialsSoon schedules the check of cred for this manager, unless
// these credentials were checked (or are being checked) already.
func (m *Manager) CheckCredentialsSoon(cred Credentials, timeout time.Duration, logger *zap.Logger) {
	fingerprint := sha256.Sum256([]byte(cred.ClientID + "\x00" + cred.ClientSecret))
	prev, loaded := CredChecked.Swap(m, fingerprint)
	if loaded && prev.([sha256.Size]byte) == fingerprint {
		return
	}
	if !loaded {
		// Forget the manager with it, so that a destroyed manager is not
		// kept alive by this map.
		context.AfterFunc(m.ctx, func() { CredChecked.Delete(m) })
	}
	go checkCredentials(m, CredCheckDelay, cred, timeout, logger)
}

// checkCredentials waits delay, then makes the check and logs what it
// found. A manager destroyed meanwhile makes no request.
func checkCredentials(m *Manager, delay time.Duration, cred Credentials, timeout time.Duration, logger *zap.Logger) {
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-m.ctx.Done():
		return
	case <-t.C:
	}
	ctx, cancel := context.WithTimeout(m.ctx, timeout)
	defer cancel()
	_, err := m.Client.Refresh(ctx, cred, credCheckRefreshToken)
	if m.ctx.Err() != nil {
		return // unloaded while asking: nobody to tell
	}
	logCredentialCheck(logger, m.TokenURL, cred.ClientID, err)
}

// logCredentialCheck reports the check's outcome: ERROR when Fortnox
// rejects the credentials, WARN when it cannot tell, INFO when they work.
// It logs the client id and token URL (which holds no credentials: Provision
// refuses user info in it), never the secret.
func logCredentialCheck(logger *zap.Logger, tokenURL, clientID string, err error) {
	fields := []zap.Field{zap.String("client_id", clientID), zap.String("token_url", tokenURL)}
	if err == nil {
		logger.Warn("credential check: the token endpoint accepted a refresh token that cannot exist; is token_url Fortnox's token endpoint?", fields...)
		return
	}
	var terr *Error
	if !errors.As(err, &terr) {
		logger.Warn("credential check failed", append(fields, zap.Error(err))...)
		return
	}
	if terr.Status != 0 {
		fields = append(fields, zap.Int("status", terr.Status))
	}
	if terr.Code != "" {
		fields = append(fields, zap.String("error_code", terr.Code))
	}
	switch terr.Failure {
	case FailBadClient:
		logger.Error("credential check: Fortnox REJECTED the client id or client secret (invalid_client); every token request will fail until they are fixed. "+
			"Check client_id and client_secret in the fortnox block, the environment variables or files they name, and that the integration is active in Fortnox's developer portal",
			fields...)
	case FailNoConsent:
		// invalid_grant for the made-up refresh token: the client was
		// authenticated. Another 4xx says as much (no invalid_client).
		logger.Info("credential check: Fortnox accepts the client id and secret", fields...)
	case FailUnavailable:
		logger.Warn("credential check: Fortnox's token endpoint cannot be reached, so the client id and secret were not checked; token requests will fail the same way until it can",
			append(fields, zap.String("cause", terr.unavailableReason()))...)
	default:
		logger.Warn("credential check: the token endpoint's answer cannot be used, so the client id and secret were not checked; check token_url",
			append(fields, zap.String("error", terr.Error()))...)
	}
}
