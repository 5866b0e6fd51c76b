package cluster

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
)

// appReceiver is the app's end of notify for the cluster: it checks each
// event's signature and counts deliveries per id. While hold is set, it
// keeps each POST waiting (unanswered) until released or the sidecar's
// connection goes away.
type appReceiver struct {
	t   *testing.T
	url string

	mu        sync.Mutex
	hold      chan struct{} // nil: answer 204 at once
	attempts  int
	abandoned int // POSTs whose sender went away while held
	delivered map[string]int
	events    []map[string]string
}

func startAppReceiver(t *testing.T) *appReceiver {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &appReceiver{t: t, url: "http://" + ln.Addr().String() + "/events", delivered: map[string]int{}}
	srv := &http.Server{Handler: http.HandlerFunc(r.serve)}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return r
}

func (r *appReceiver) serve(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	mac := hmac.New(sha256.New, []byte(notifySecret))
	mac.Write(body)
	if !hmac.Equal([]byte("sha256="+hex.EncodeToString(mac.Sum(nil))), []byte(req.Header.Get("X-Fortnox-Signature"))) {
		r.t.Errorf("receiver: bad signature on %s", body)
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	var ev map[string]string
	if err := json.Unmarshal(body, &ev); err != nil {
		r.t.Errorf("receiver: %v: %s", err, body)
	}
	r.mu.Lock()
	r.attempts++
	hold := r.hold
	r.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-req.Context().Done():
			r.mu.Lock()
			r.abandoned++
			r.mu.Unlock()
			return
		}
	}
	r.mu.Lock()
	r.delivered[ev["id"]]++
	r.events = append(r.events, ev)
	r.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// count is how many deliveries of event for tenant the app got.
func (r *appReceiver) count(event, tenant string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, ev := range r.events {
		if ev["event"] == event && ev["tenant"] == tenant {
			n++
		}
	}
	return n
}

func (r *appReceiver) doubles() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for id, n := range r.delivered {
		if n > 1 {
			out = append(out, id)
		}
	}
	return out
}

// Three sidecars on one Redis each apply a revocation (one through its
// webhook, two through the broadcast): the app gets exactly one event per
// change of state. An event whose deliverer dies while the app holds it
// is delivered by another sidecar once its lease ends.
func TestNotifyOnceAcrossTheCluster(t *testing.T) {
	t.Parallel()
	fake := startFake(t, 0)
	app := startAppReceiver(t)
	c := startCluster(t, fake, settings{maxWait: 10 * time.Second, notifyURL: app.url})
	const tenant = "1400001"
	fake.GrantConsent(clientID, tenant)
	for _, sc := range c.sidecars {
		sc.mustServe(tenant)
	}

	rounds := []struct {
		event, via string
		through    int
	}{
		{"consent_revoked", "client_credentials_consent_revoked", 0},
		{"consent_created", "client_credentials_consent", 1},
		{"consent_revoked", "client_credentials_consent_revoked", 2},
	}
	for i, rd := range rounds {
		c.sidecars[rd.through].postConsentEvent(rd.via, tenant)
		want := 1 + i/2
		testproc.WaitFor(t, rd.event+" delivered", 15*time.Second, func() bool { return app.count(rd.event, tenant) >= want })
		// Every sidecar applies it (and would claim it) meanwhile; the
		// others scan the store every 5 s.
		untilAll(t, c, tenant, time.Now(), 5*time.Second, func(a answer) bool {
			return (a.status == http.StatusOK) == (rd.event == "consent_created")
		})
		time.Sleep(6 * time.Second)
		if n := app.count(rd.event, tenant); n != want {
			t.Fatalf("round %d (%s through %s): %d deliveries, want %d", i, rd.event, c.sidecars[rd.through].name, n, want)
		}
	}
	if d := app.doubles(); len(d) > 0 {
		t.Errorf("ids delivered twice: %v", d)
	}

	// The app holds the next event unanswered; the sidecar that sends it
	// dies. Another takes it when its lease ends.
	const second = "1400002"
	fake.GrantConsent(clientID, second)
	app.mu.Lock()
	app.hold = make(chan struct{})
	hold := app.hold
	attempts := app.attempts
	app.mu.Unlock()
	c.sidecars[0].postConsentEvent("client_credentials_consent_revoked", second)
	testproc.WaitFor(t, "the app holds a delivery", 15*time.Second, func() bool {
		app.mu.Lock()
		defer app.mu.Unlock()
		return app.attempts > attempts
	})
	// Find the deliverer by killing sidecars in turn (its POST ends when
	// it dies), within the POST's own 10 s timeout; the others come back.
	var deliverer *sidecar
	var killed []*sidecar
	for _, sc := range c.sidecars {
		sc.kill()
		killed = append(killed, sc)
		deadline := time.Now().Add(1500 * time.Millisecond)
		for deliverer == nil && time.Now().Before(deadline) {
			app.mu.Lock()
			if app.abandoned > 0 {
				deliverer = sc
			}
			app.mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
		if deliverer != nil {
			break
		}
	}
	if deliverer == nil {
		t.Fatal("no sidecar held the delivery")
	}
	for _, sc := range killed {
		if sc != deliverer {
			sc.start()
		}
	}
	t.Logf("%s was delivering when it was killed", deliverer.name)
	app.mu.Lock()
	app.hold = nil
	app.mu.Unlock()
	close(hold)
	took := testproc.WaitFor(t, "the event delivered by another sidecar", 60*time.Second, func() bool { return app.count("consent_revoked", second) == 1 })
	t.Logf("delivered %v after the deliverer died (lease %v)", took, 30*time.Second)
	deliverer.start()
	time.Sleep(6 * time.Second)
	if n := app.count("consent_revoked", second); n != 1 {
		t.Errorf("%d deliveries of the second revocation, want 1", n)
	}
	if d := app.doubles(); len(d) > 0 {
		t.Errorf("ids delivered twice: %v", d)
	}
}
