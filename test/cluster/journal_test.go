package cluster

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// rotationRig is a cluster whose Redis was killed while sidecar a's
// rotation of a tenant's refresh token was in flight: Fortnox rotated the
// token, and the store was gone before a could write the rotated one.
type rotationRig struct {
	t        *testing.T
	c        *cluster
	fake     *fakefortnox.Server
	tenant   string
	before   int // refresh requests before the rotation
	killedAt time.Time
	// others polls b and c from the kill on.
	others *poller
}

// killRedisMidRotation starts the cluster, makes a rotate the tenant's
// refresh token (its access token dropped through the admin API) while
// Fortnox holds its answer back, and kills Redis (SIGKILL) after Fortnox
// rotated the token but before a stored it. It returns once a has served
// the request with the new access token.
func killRedisMidRotation(t *testing.T, tenant string) *rotationRig {
	t.Helper()
	fake := startFake(t, 0)
	fake.SetRevokeChainOnReuse(true) // a spent token presented again would kill the chain
	c := startCluster(t, fake, settings{maxWait: 10 * time.Second})
	a := c.sidecars[0]
	a.putRefreshToken(tenant, fake.IssueRefreshToken(clientID, tenant))
	a.mustServe(tenant)
	a.deleteAdmin("/fortnox/tenants/" + tenant + "/token") // the next request rotates
	r := &rotationRig{t: t, c: c, fake: fake, tenant: tenant, before: fake.TokenRequests("refresh_token", tenant)}

	fake.SetTenantFault(tenant, fakefortnox.Fault{AnswerDelay: time.Second})
	held := make(chan answer, 1)
	go func() { held <- a.get(tenant) }()
	testproc.WaitFor(t, "a's refresh-token request reaches Fortnox", 10*time.Second, func() bool {
		return fake.TokenRequests("refresh_token", tenant) > r.before
	})
	fake.ClearTenantFault(tenant)
	c.redis.Kill() // Fortnox rotated; its answer is on its way
	r.killedAt = time.Now()
	r.others = r.poll(c.sidecars[1], c.sidecars[2])
	if got := <-held; got.status != http.StatusOK {
		t.Fatalf("a, the rotation's holder, answered %v while Redis was down; want 200 with the new access token", got)
	}
	// The rotation met the dead store (not a store that took it before the
	// kill): its record waits in a's journal.
	a.waitLog("could not be saved to the store: it is kept in the journal", 1, 5*time.Second)
	return r
}

// poller asks sidecars for the tenant every 250 ms and keeps every answer.
type poller struct {
	mu      sync.Mutex
	answers []timedAnswer
	stop    chan struct{}
	done    sync.WaitGroup
}

func (r *rotationRig) poll(sidecars ...*sidecar) *poller {
	p := &poller{stop: make(chan struct{})}
	for _, sc := range sidecars {
		p.done.Add(1)
		go func() {
			defer p.done.Done()
			for {
				a := sc.get(r.tenant)
				p.mu.Lock()
				p.answers = append(p.answers, timedAnswer{answer: a, sidecar: sc.name, at: time.Now()})
				p.mu.Unlock()
				select {
				case <-p.stop:
					return
				case <-time.After(250 * time.Millisecond):
				}
			}
		}()
	}
	return p
}

// servedAll waits until every named sidecar has answered 200 at or after
// since, and returns how long after since the last of them did.
func (p *poller) servedAll(t *testing.T, since time.Time, within time.Duration, names ...string) time.Duration {
	t.Helper()
	var took time.Duration
	testproc.WaitFor(t, "every sidecar serves the tenant with the rotated token", within+time.Second, func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		took = 0
		for _, name := range names {
			var first time.Time
			for _, a := range p.answers {
				if a.sidecar == name && a.status == http.StatusOK && !a.at.Before(since) {
					first = a.at
					break
				}
			}
			if first.IsZero() {
				return false
			}
			took = max(took, first.Sub(since))
		}
		return true
	})
	return took
}

// finish stops polling and checks every answer: 503 with Retry-After or
// 200, never a 403; it returns how many were 503 refresh_in_progress.
func (p *poller) finish(t *testing.T) (inProgress int) {
	t.Helper()
	close(p.stop)
	p.done.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	var bad []string
	var slowest time.Duration
	for _, a := range p.answers {
		slowest = max(slowest, a.took)
		if a.took > 10*time.Second {
			t.Errorf("%s took %v to answer, longer than max_wait", a.sidecar, a.took)
		}
		switch {
		case a.status == http.StatusOK:
		case a.status == http.StatusServiceUnavailable && a.retryAfter != "":
			if strings.Contains(a.body, `"refresh_in_progress"`) {
				inProgress++
			}
		default:
			bad = append(bad, a.sidecar+" at "+a.at.Format("15:04:05.000")+": "+a.answer.String())
		}
	}
	t.Logf("%d answers from the others, the slowest in %v", len(p.answers), slowest.Round(time.Millisecond))
	if len(bad) > 0 {
		t.Errorf("%d of %d answers were neither 200 nor 503 with Retry-After (a 403 means a spent token was presented); first: %v",
			len(bad), len(p.answers), bad[:min(3, len(bad))])
	}
	return inProgress
}

// checkChain checks that no spent refresh token was presented again and
// the chain still works: b drops the access token and refreshes with the
// stored (rotated) refresh token.
func (r *rotationRig) checkChain() {
	t := r.t
	t.Helper()
	if n := r.fake.SpentRefreshTokenReuses(); n != 0 {
		t.Errorf("a spent refresh token was presented %d times", n)
	}
	if n := r.fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant answers", n)
	}
	if n := r.fake.TokenRequests("refresh_token", r.tenant) - r.before; n != 1 {
		t.Errorf("%d refresh requests since the rotation, want 1 (a's): another sidecar refreshed", n)
	}
	b := r.c.sidecars[1]
	b.deleteAdmin("/fortnox/tenants/" + r.tenant + "/token")
	b.mustServe(r.tenant)
	if r.fake.TokenRequests("refresh_token", r.tenant)-r.before != 2 || r.fake.SpentRefreshTokenReuses() != 0 || r.fake.TokenErrors("invalid_grant") != 0 {
		t.Errorf("the chain did not go on from the rotated refresh token (refreshes %d, reuses %d, invalid_grant %d)",
			r.fake.TokenRequests("refresh_token", r.tenant)-r.before, r.fake.SpentRefreshTokenReuses(), r.fake.TokenErrors("invalid_grant"))
	}
	if n := r.fake.LiveRefreshTokens(clientID, r.tenant, ""); n != 1 {
		t.Errorf("%d live refresh tokens, want 1 (the chain)", n)
	}
}

// Redis killed (SIGKILL) after Fortnox rotated a tenant's refresh token
// but before the holder stored it, and started again from its
// append-only file 3 s later: the rotated token is in Redis within 5 s of
// the restart (the other sidecars serve with it, without a token request
// of their own); meanwhile they answer 503 with Retry-After, never 403,
// and never present the spent token (the fake would revoke the chain).
func TestRedisKilledMidRotation(t *testing.T) {
	t.Parallel()
	r := killRedisMidRotation(t, "2100001")
	b, c := r.c.sidecars[1], r.c.sidecars[2]
	p := r.others
	time.Sleep(time.Until(r.killedAt.Add(3 * time.Second)))
	if err := r.c.redis.Restart(); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	took := p.servedAll(t, restarted, 5*time.Second, b.name, c.name)
	inProgress := p.finish(t)
	t.Logf("the rotated token served by b and c %v after Redis restarted; %d answers were 503 refresh_in_progress, %d in all",
		took.Round(time.Millisecond), inProgress, len(p.answers))
	if took > 5*time.Second {
		t.Errorf("the rotated token reached Redis %v after its restart, want within 5 s", took)
	}
	r.checkChain()
}

// The holder stopped while Redis is down (SIGTERM, as a rolling restart
// does; or SIGKILL) and started again on the same disk after Redis is
// back and the lock it held has run out: until then the others answer
// 503 refresh_in_progress (the mark lives in Redis), never 403, never
// spending the token; within 5 s of the holder's start its journal puts
// the rotated token in Redis.
func TestHolderRestartedMidRotation(t *testing.T) {
	t.Parallel()
	holderRestarted(t, "2100002", false)
}

func TestHolderRestartedMidRotationAfterSIGKILL(t *testing.T) {
	t.Parallel()
	holderRestarted(t, "2100003", true)
}

func holderRestarted(t *testing.T, tenant string, kill bool) {
	r := killRedisMidRotation(t, tenant)
	a, b, c := r.c.sidecars[0], r.c.sidecars[1], r.c.sidecars[2]
	if kill {
		a.kill()
	} else {
		start := time.Now()
		a.stop() // its shutdown flush meets no Redis; bounded
		t.Logf("a stopped %v after SIGTERM", time.Since(start).Round(time.Millisecond))
	}
	if err := r.c.redis.Restart(); err != nil {
		t.Fatal(err)
	}
	p := r.others
	// Redis is back, the holder is not, and the lock it held runs out
	// (its lease, 10 s, was last renewed before Redis died): only the
	// mark keeps b and c from spending the refresh token meanwhile.
	time.Sleep(time.Until(r.killedAt.Add(10500 * time.Millisecond)))
	a.start()
	started := time.Now()
	took := p.servedAll(t, started, 5*time.Second, b.name, c.name)
	inProgress := p.finish(t)
	t.Logf("the rotated token served by b and c %v after a started again; %d answers were 503 refresh_in_progress, %d in all",
		took.Round(time.Millisecond), inProgress, len(p.answers))
	if inProgress == 0 {
		t.Error("no answer said refresh_in_progress while the holder was away")
	}
	if took > 5*time.Second {
		t.Errorf("the rotated token reached Redis %v after the holder started, want within 5 s", took)
	}
	r.checkChain()
}
