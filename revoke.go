package fortnox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// revokeURL is Fortnox's revoke endpoint beside the token endpoint:
// …/oauth-v1/token → …/oauth-v1/revoke.
func revokeURL(tokenURL string) string {
	if base, ok := strings.CutSuffix(tokenURL, "/token"); ok {
		return base + "/revoke"
	}
	return strings.TrimSuffix(tokenURL, "/") + "/revoke"
}

// revokeClient sends revoke requests: bounded, never following redirects
// (the secret would go elsewhere).
var revokeClient = &http.Client{
	Timeout:       30 * time.Second,
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// revokeRefreshToken revokes a refresh token at Fortnox (POST
// /oauth-v1/revoke, token_type_hint=refresh_token). Fortnox answers
// {"revoked":true}.
func (m *tokenManager) revokeRefreshToken(ctx context.Context, s *managerSettings, refreshToken string) error {
	form := url.Values{"token_type_hint": {"refresh_token"}, "token": {refreshToken}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, revokeURL(m.tokenURL), strings.NewReader(form.Encode()))
	if err != nil {
		return &tokenError{failure: failBadAnswer, cause: errors.New("the revoke URL is not usable")}
	}
	req.SetBasicAuth(url.QueryEscape(s.cred.clientID), url.QueryEscape(s.cred.clientSecret))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "caddy-fortnox")
	resp, err := revokeClient.Do(req)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // without the URL
		}
		return &tokenError{failure: failUnavailable, cause: err}
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxAdminBody))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return &tokenError{failure: failUnavailable, status: resp.StatusCode}
	case resp.StatusCode == http.StatusUnauthorized:
		return &tokenError{failure: failBadClient, status: resp.StatusCode}
	}
	return &tokenError{failure: failBadAnswer, status: resp.StatusCode, cause: fmt.Errorf("the revoke endpoint answered %d", resp.StatusCode)}
}
