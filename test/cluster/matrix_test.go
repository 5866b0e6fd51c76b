package cluster

import (
	"net/http"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// The failure matrix of issue 18 ("Done means"): each test breaks one
// thing under real processes on 127.0.0.1 and checks what the apps and
// Fortnox saw. Every test here also asserts that no spent refresh token
// was presented again (the fake revokes the whole chain if one is), and
// that Fortnox answered no 429.

// strictFake is startFake with a refresh token presented twice revoking
// its whole chain, as OAuth 2.1 allows a server to do.
func strictFake(t *testing.T) *fakefortnox.Server {
	fake := startFake(t, 0)
	fake.SetRevokeChainOnReuse(true)
	return fake
}

// checkFortnoxSaw fails the test if Fortnox answered a 429 or was shown a
// spent refresh token.
func checkFortnoxSaw(t *testing.T, fake *fakefortnox.Server) {
	t.Helper()
	if n := fake.TooMany(""); n != 0 {
		t.Errorf("Fortnox answered %d requests with 429", n)
	}
	if n := fake.SpentRefreshTokenReuses(); n != 0 {
		t.Errorf("a spent refresh token was presented %d times", n)
	}
}

// revokedConsent is how a sidecar answers a tenant whose service-account
// consent was revoked: 403 consent_revoked.
func revokedConsent(a answer) bool {
	return a.status == http.StatusForbidden && errorCode(a) == "consent_revoked"
}

// deleteAndRevokeSetup has a and b serve a named account (anna of
// accountTenant, on its own refresh token) and a tenant on client
// credentials (consentTenant), so that both hold their tokens.
func deleteAndRevokeSetup(t *testing.T, a, b *sidecar, accountTenant, consentTenant string) {
	t.Helper()
	fake := a.fake
	fake.GrantConsent(clientID, accountTenant)
	fake.GrantConsent(clientID, consentTenant)
	a.putAccountRefreshToken(accountTenant, "anna", fake.IssueUserRefreshToken(clientID, accountTenant, "7"))
	for _, sc := range []*sidecar{a, b} {
		if r := sc.getAs(accountTenant, "anna"); r.status != http.StatusOK {
			t.Fatalf("%s as anna before: %v", sc.name, r)
		}
		sc.mustServe(consentTenant)
	}
}

// deleteAndRevoke deletes anna through a's admin API and revokes the
// consent through a's webhook, and checks that a refuses both at once.
func deleteAndRevoke(t *testing.T, a *sidecar, accountTenant, consentTenant string) {
	t.Helper()
	a.deleteAdmin("/fortnox/tenants/" + accountTenant + "/accounts/anna")
	a.postConsentEvent("client_credentials_consent_revoked", consentTenant)
	if r := a.getAs(accountTenant, "anna"); !deletedAccount(r) {
		t.Fatalf("a as anna after deleting it: %v", r)
	}
	if r := a.get(consentTenant); !revokedConsent(r) {
		t.Fatalf("a for %s after the revocation: %v", consentTenant, r)
	}
}

// Issue 18 item 3: a broadcast lost on its way to a sidecar (its
// subscription stays up, nothing is reconnected, so nothing resyncs) is
// noticed on that sidecar's next request for the tenant, through the
// generation the rate limiter's turn answers. Here what Redis sends b's
// subscription is dropped while a deletes a named account and revokes a
// tenant's consent: b's very next request as the account is answered as a
// deleted account's, and for the tenant as a revoked one's.
func TestLostBroadcastIsNoticedOnTheNextRequest(t *testing.T) {
	t.Parallel()
	a, b, relay := relayedPair(t)
	a.fake.SetRevokeChainOnReuse(true)
	const accountTenant, consentTenant = "1910001", "1910002"
	deleteAndRevokeSetup(t, a, b, accountTenant, consentTenant)

	relay.MuteSubscribers(true)
	deleteAndRevoke(t, a, accountTenant, consentTenant)
	time.Sleep(500 * time.Millisecond) // the broadcasts reach b's relay, and are dropped
	if r := b.getAs(accountTenant, "anna"); !deletedAccount(r) {
		t.Errorf("b as anna on its first request after the lost broadcast: %v, want 403 account_not_authorized", r)
	}
	if r := b.get(consentTenant); !revokedConsent(r) {
		t.Errorf("b for %s on its first request after the lost broadcast: %v, want 403 consent_revoked", consentTenant, r)
	}
	relay.MuteSubscribers(false)
	if lines := b.logLines("subscribed to the cluster's events again"); len(lines) != 0 {
		t.Errorf("b subscribed again (and resynced): the test did not lose a broadcast as meant")
	}
	if lines := b.logLines("a broadcast was missed"); len(lines) == 0 {
		t.Errorf("b logged no revalidation of a changed subject")
	}
	checkFortnoxSaw(t, a.fake)
}

// Issue 18's failure matrix, a sidecar cut off: b's link to Redis is cut
// while a deletes a named account and revokes a tenant's consent. Within
// 1 s of the link coming back, b refuses both (polled every 100 ms), and
// never serves either again.
func TestCutOffSidecarMissesDeleteAndRevoke(t *testing.T) {
	t.Parallel()
	a, b, relay := relayedPair(t)
	a.fake.SetRevokeChainOnReuse(true)
	const accountTenant, consentTenant = "1920001", "1920002"
	deleteAndRevokeSetup(t, a, b, accountTenant, consentTenant)

	relay.Cut()
	deleteAndRevoke(t, a, accountTenant, consentTenant)
	time.Sleep(time.Second) // b cannot know: its link is down
	if err := relay.Restore(); err != nil {
		t.Fatal(err)
	}
	restored := time.Now()
	subjects := []struct {
		name    string
		get     func() answer
		refused func(answer) bool
		stopped time.Duration
	}{
		{"the deleted account", func() answer { return b.getAs(accountTenant, "anna") }, deletedAccount, -1},
		{"the revoked tenant", func() answer { return b.get(consentTenant) }, revokedConsent, -1},
	}
	// 15 requests per subject at most: inside each tenant's budget.
	for time.Since(restored) < 1500*time.Millisecond {
		for i := range subjects {
			s := &subjects[i]
			r := s.get()
			at := time.Since(restored)
			switch {
			case s.refused(r):
				if s.stopped < 0 {
					s.stopped = at
				}
			case r.status == http.StatusOK && s.stopped >= 0:
				t.Errorf("b served %s again %v after the link came back (it had stopped after %v)", s.name, at.Round(time.Millisecond), s.stopped.Round(time.Millisecond))
			case r.status != http.StatusOK:
				t.Errorf("b for %s %v after the link came back: %v", s.name, at.Round(time.Millisecond), r)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, s := range subjects {
		switch {
		case s.stopped < 0:
			t.Errorf("b still served %s 1.5 s after its link to Redis came back", s.name)
		case s.stopped > time.Second:
			t.Errorf("b stopped serving %s %v after its link came back, want within 1 s", s.name, s.stopped.Round(time.Millisecond))
		default:
			t.Logf("b stopped serving %s %v after its link to Redis came back", s.name, s.stopped.Round(time.Millisecond))
		}
	}
	checkFortnoxSaw(t, a.fake)
}
