package tokens

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// The app hears of broken chains: with `notify { url …; secret … }` in the
// fortnox block, each change of a subject's state that the app must act on
// (a refresh-token chain rejected or lost, a consent revoked or created, a
// handed-over token quarantined) is POSTed to the app as a small signed
// JSON event, at least once, off the request path.
//
// An event is first claimed in the store (Caddy's storage, or Redis in
// cluster mode) by tenant, account and kind of state: the claim records
// the state the app was last told of, and only a change of it makes an
// event, so a tenant that fails a hundred requests, or a revocation that
// three sidecars apply, makes one. The claim and the pending event are
// written together; pending events stay in the store until the app
// answers 2xx or a day has passed, and are taken for delivery under a
// lease, so that one sidecar delivers each, and another takes over when
// that one dies.

// Notification kinds (the "event" field).
const (
	notifyReconnectRequired = "reconnect_required"
	notifyConsentRevoked    = "consent_revoked"
	notifyConsentCreated    = "consent_created"
	notifyQuarantined       = "quarantined"
)

// Delivery schedule.
const (
	// notifyFirstRetry is the wait after the first failed delivery; each
	// further failure doubles it, up to notifyMaxRetry.
	notifyFirstRetry = 5 * time.Second
	NotifyMaxRetry   = 5 * time.Minute
	// notifyGiveUp: an event not delivered this long after it was made is
	// dropped (one log line).
	notifyGiveUp = 24 * time.Hour
	// notifyTimeout bounds one delivery attempt.
	notifyTimeout = 10 * time.Second
	// notifyLease: a sidecar that took an event for delivery holds it this
	// long; if it dies meanwhile, another takes it after that.
	notifyLease = 30 * time.Second
	// notifyScanEvery: how often (real time) the store is looked at for
	// events other sidecars left due, or that were pending at start.
	notifyScanEvery = 5 * time.Second
	// notifyClaimMemory: how long the state the app was last told of is
	// remembered.
	NotifyClaimMemory = 90 * 24 * time.Hour
	// notifyMaxUnsent bounds the events kept in memory while the store
	// cannot take them.
	notifyMaxUnsent = 1000
)

// NotifySettings is a resolved Notify.
type NotifySettings struct {
	Url    string
	Host   string // for log lines: never the path or query, which may carry a key
	Secret []byte
}

// sign is the X-Fortnox-Signature value of body.
func (ns *NotifySettings) sign(body []byte) string {
	mac := hmac.New(sha256.New, ns.Secret)
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// Notification is the body the app receives.
type Notification struct {
	ID      string `json:"id"`
	Event   string `json:"event"`
	Tenant  string `json:"tenant"`
	Account string `json:"account"`
	Reason  string `json:"reason"`
	At      string `json:"at"`
}

// PendingEvent is a notification not delivered yet, as the store keeps it.
type PendingEvent struct {
	ID string `json:"id"`
	// Body is exactly what is POSTed, every time (its signature too).
	Body      string    `json:"body"`
	Event     string    `json:"event"`
	Tenant    string    `json:"tenant"`
	Account   string    `json:"account,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	Attempts  int       `json:"attempts"`
	NextAt    time.Time `json:"next_at"`
	// LeaseUntil: taken for delivery until then (Caddy's storage; Redis
	// keeps the lease in its queue's score).
	LeaseUntil time.Time `json:"lease_until,omitzero"`
}

func newPendingEvent(event string, subj Subject, reason string, at time.Time) *PendingEvent {
	n := at.UTC()
	id := newNotificationID()
	body, _ := json.Marshal(Notification{ID: id, Event: event, Tenant: subj.Tenant, Account: subj.Account, Reason: reason, At: n.Format(time.RFC3339Nano)})
	return &PendingEvent{ID: id, Body: string(body), Event: event, Tenant: subj.Tenant, Account: subj.Account, CreatedAt: n, NextAt: n}
}

// newNotificationID is 16 random bytes in hex.
func newNotificationID() string {
	return RandomID() + RandomID()
}

// ValidNotificationID: what newNotificationID makes.
func ValidNotificationID(id string) bool {
	if len(id) != 32 {
		return false
	}
	_, err := hex.DecodeString(id)
	return err == nil && strings.ToLower(id) == id
}

func (ev *PendingEvent) logFields() []zap.Field {
	f := []zap.Field{zap.String("notification", ev.ID), zap.String("event", ev.Event), zap.String("tenant", ev.Tenant)}
	if ev.Account != "" {
		f = append(f, zap.String("account", ev.Account))
	}
	return f
}

// NotifyRetryAfter is the wait after the n-th failed attempt.
func NotifyRetryAfter(attempts int) time.Duration {
	if attempts > 10 {
		return NotifyMaxRetry
	}
	return min(notifyFirstRetry<<(attempts-1), NotifyMaxRetry)
}

// NotifyStore is where claims and pending events live: Caddy's storage
// (storageNotes), or Redis in cluster mode (redisstate.Notes).
type NotifyStore interface {
	// enqueue stores ev as pending. With a claim, only when claim's state
	// differs from the one recorded last (then it is recorded): it says
	// whether ev was stored.
	Enqueue(ctx context.Context, claim *NotifyClaim, ev *PendingEvent) (bool, error)
	// release forgets the state recorded for a claim key, so that the
	// next change is told again.
	Release(ctx context.Context, key string) error
	// take returns up to max events due at n, each leased until until.
	Take(ctx context.Context, n, until time.Time, max int) ([]*PendingEvent, error)
	// done removes a delivered (or dropped) event.
	Done(ctx context.Context, ev *PendingEvent) error
	// later puts ev back, due at ev.NextAt.
	Later(ctx context.Context, ev *PendingEvent) error
}

// NotifyClaim names a subject's kind of state and the state the app is
// about to be told of.
type NotifyClaim struct {
	Key   string // tenant[/accounts/account]/topic
	State string
}

// claimKey is the claim key of a subject's topic.
func claimKey(subj Subject, topic string) string {
	if subj.Account == "" {
		return subj.Tenant + "/" + topic
	}
	return subj.Tenant + "/accounts/" + subj.Account + "/" + topic
}

// Claim topics and their states.
const (
	topicChain   = "chain"   // state "broken": the app was told to reconnect
	topicConsent = "consent" // state "revoked" or "created"
)

// notifier emits and delivers one token manager's notifications.
type notifier struct {
	m      *Manager
	client *http.Client
	kick   chan struct{}
	// emitting counts emissions still being written: a manager being
	// destroyed waits for them (bounded).
	emitting sync.WaitGroup

	mu sync.Mutex
	// unsent holds emissions the store refused (an outage); each pass
	// tries them again.
	unsent []emission
	// nextDue is the earliest time an event this sidecar put back is due
	// (zero: none known); lastScan when the store was last looked at.
	nextDue    time.Time
	lastScan   time.Time
	storeAlarm bool // the store refused an emission: logged once until it works
}

type emission struct {
	claim *NotifyClaim
	ev    *PendingEvent
}

func newNotifier(m *Manager) *notifier {
	return &notifier{
		m:    m,
		kick: make(chan struct{}, 1),
		client: &http.Client{
			Timeout: notifyTimeout,
			// A redirect would carry the event (and its signature) to
			// another place than the one configured.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
}

// settings is the notify block in force (nil: none).
func (n *notifier) settings() *NotifySettings {
	if n == nil { // a manager made without newTokenManager (unit tests)
		return nil
	}
	if s := n.m.Settings.Load(); s != nil {
		return s.Notify
	}
	return nil
}

// store is where this manager's claims and events live (nil: nowhere yet).
func (n *notifier) store() NotifyStore {
	if c := n.m.Cluster.Load(); c != nil {
		return c.Notes()
	}
	s := n.m.Settings.Load()
	if s == nil || s.Records == nil || s.Records.Storage == nil {
		return nil
	}
	return &storageNotes{storage: s.Records.Storage, clientID: n.m.clientID, clock: n.m.clock}
}

// emit makes an event, claimed (when claim is set) so that each change of
// state is told once, and writes it to the store in the background: a
// request never waits for it.
func (n *notifier) emit(event string, subj Subject, reason string, claim *NotifyClaim) {
	if n.settings() == nil {
		return
	}
	e := emission{claim: claim, ev: newPendingEvent(event, subj, reason, n.m.clock.Now())}
	n.emitting.Add(1)
	go func() {
		defer n.emitting.Done()
		n.write(e)
	}()
}

// write stores an emission; when the store refuses, it is kept in memory
// and tried again on each pass.
func (n *notifier) write(e emission) bool {
	store := n.store()
	var stored bool
	err := errors.New("no store yet")
	if store != nil {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(n.m.ctx), notifyTimeout)
		stored, err = store.Enqueue(ctx, e.claim, e.ev)
		cancel()
	}
	log := n.m.Logger()
	if err != nil {
		n.mu.Lock()
		alarm := !n.storeAlarm
		n.storeAlarm = true
		if len(n.unsent) < notifyMaxUnsent {
			n.unsent = append(n.unsent, e)
		}
		n.mu.Unlock()
		if alarm {
			log.Warn("a notification could not be written to the store: it is kept in memory and written when the store works",
				append(e.ev.logFields(), zap.Error(err))...)
		}
		return false
	}
	n.mu.Lock()
	n.storeAlarm = false
	n.mu.Unlock()
	if !stored {
		if ce := log.Check(zap.DebugLevel, "notification not made: the app was told of this state already"); ce != nil {
			ce.Write(e.ev.logFields()...)
		}
		return true
	}
	log.Info("notification queued", e.ev.logFields()...)
	select {
	case n.kick <- struct{}{}:
	default:
	}
	return true
}

// release forgets a claim in the background, so that the next change of
// that state is told again.
func (n *notifier) release(key string) {
	if n.settings() == nil {
		return
	}
	n.emitting.Add(1)
	go func() {
		defer n.emitting.Done()
		store := n.store()
		if store == nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.WithoutCancel(n.m.ctx), notifyTimeout)
		defer cancel()
		if err := store.Release(ctx, key); err != nil {
			n.m.Logger().Warn("could not reset what the app was last told of a tenant: its next break may not be told", zap.String("claim", key), zap.Error(err))
		}
	}()
}

// wait waits (bounded) for emissions still being written.
func (n *notifier) wait(limit time.Duration) {
	if n == nil {
		return
	}
	done := make(chan struct{})
	go func() {
		n.emitting.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(limit):
	}
}

// run delivers pending events until the manager is destroyed.
func (n *notifier) run() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		kicked := false
		select {
		case <-n.m.ctx.Done():
			return
		case <-t.C:
		case <-n.kick:
			kicked = true
		}
		n.pass(kicked)
	}
}

// pass writes unsent emissions, then delivers what is due.
func (n *notifier) pass(kicked bool) {
	ns := n.settings()
	if ns == nil {
		return
	}
	n.mu.Lock()
	unsent := n.unsent
	n.unsent = nil
	due := kicked || (!n.nextDue.IsZero() && !n.m.clock.Now().Before(n.nextDue)) || time.Since(n.lastScan) >= notifyScanEvery
	if due {
		n.nextDue, n.lastScan = time.Time{}, time.Now()
	}
	n.mu.Unlock()
	for i, e := range unsent {
		if !n.write(e) {
			n.mu.Lock()
			n.unsent = append(n.unsent, unsent[i+1:]...)
			n.mu.Unlock()
			break
		}
	}
	if !due {
		return
	}
	store := n.store()
	if store == nil {
		return
	}
	for n.m.ctx.Err() == nil {
		ctx, cancel := context.WithTimeout(n.m.ctx, notifyTimeout)
		at := n.m.clock.Now()
		evs, err := store.Take(ctx, at, at.Add(notifyLease), 16)
		cancel()
		if err != nil {
			if ce := n.m.Logger().Check(zap.DebugLevel, "could not read pending notifications"); ce != nil {
				ce.Write(zap.Error(err))
			}
			return
		}
		for _, ev := range evs {
			n.deliver(ns, store, ev)
		}
		if len(evs) < 16 {
			return
		}
	}
}

// deliver POSTs one event; on failure it is put back with the next
// attempt's time, or dropped once it is a day old.
func (n *notifier) deliver(ns *NotifySettings, store NotifyStore, ev *PendingEvent) {
	log := n.m.Logger()
	ev.Attempts++
	err := n.post(ns, ev)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(n.m.ctx), notifyTimeout)
	defer cancel()
	if err == nil {
		if derr := store.Done(ctx, ev); derr != nil {
			log.Warn("a notification was delivered but could not be removed from the store: it may be delivered again", append(ev.logFields(), zap.Error(derr))...)
		}
		log.Info("notification delivered", append(ev.logFields(), zap.Int("attempts", ev.Attempts))...)
		return
	}
	if n.m.clock.Now().Sub(ev.CreatedAt) >= notifyGiveUp {
		_ = store.Done(ctx, ev)
		log.Error("notification dropped: the app did not take it within a day", append(ev.logFields(),
			zap.Int("attempts", ev.Attempts), zap.Time("created_at", ev.CreatedAt), zap.String("receiver", ns.Host), zap.Error(err))...)
		return
	}
	ev.NextAt = n.m.clock.Now().Add(NotifyRetryAfter(ev.Attempts))
	ev.LeaseUntil = time.Time{}
	if lerr := store.Later(ctx, ev); lerr != nil {
		log.Warn("a notification that failed could not be put back: another sidecar retries it when its lease ends", append(ev.logFields(), zap.Error(lerr))...)
	}
	n.mu.Lock()
	if n.nextDue.IsZero() || ev.NextAt.Before(n.nextDue) {
		n.nextDue = ev.NextAt
	}
	n.mu.Unlock()
	level := zap.DebugLevel
	if ev.Attempts == 1 {
		level = zap.WarnLevel
	}
	if ce := log.Check(level, "notification not delivered: it is tried again"); ce != nil {
		ce.Write(append(ev.logFields(), zap.Int("attempts", ev.Attempts), zap.Time("next_attempt", ev.NextAt),
			zap.String("receiver", ns.Host), zap.Error(err))...)
	}
}

// post sends one attempt; any 2xx is delivered.
func (n *notifier) post(ns *NotifySettings, ev *PendingEvent) error {
	body := []byte(ev.Body)
	ctx, cancel := context.WithTimeout(n.m.ctx, notifyTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, ns.Url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Fortnox-Signature", ns.sign(body))
	req.Header.Set("User-Agent", "caddy-fortnox")
	resp, err := n.client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL may carry a key in its query: never logged
		}
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("the receiver answered HTTP %d", resp.StatusCode)
	}
	return nil
}

// The hooks: each is one call where the state changes.

// notifyChainBroken tells the app that subj's refresh-token chain was
// rejected (reason refresh_token_rejected) and must be connected again.
func (n *notifier) notifyChainBroken(subj Subject, reason string) {
	n.emit(notifyReconnectRequired, subj, reason, &NotifyClaim{Key: claimKey(subj, topicChain), State: "broken"})
}

// notifyRecordLost tells the app that subj, which this sidecar knew to
// run on a refresh token, has no record any more (reason record_lost).
// What this sidecar remembers of the chain goes with it, so that it is
// noticed once.
func (n *notifier) notifyRecordLost(subj Subject) {
	m := n.m
	if m.ledger.lostRecord(subj.Key()) {
		n.notifyChainBroken(subj, "record_lost")
	}
}

// notifyChainRestored re-arms reconnect_required for subj: a new refresh
// token was stored.
func (n *notifier) notifyChainRestored(subj Subject) {
	n.release(claimKey(subj, topicChain))
}

// notifyConsent tells the app of a consent revoked or created (kind is
// eventRevoked or eventCreated); applied by several sidecars, it is told
// once.
func (n *notifier) notifyConsent(tenant, kind string) {
	state, event := "created", notifyConsentCreated
	if kind == eventRevoked {
		state, event = "revoked", notifyConsentRevoked
	}
	subj := Subject{Tenant: tenant}
	n.emit(event, subj, "webhook", &NotifyClaim{Key: claimKey(subj, topicConsent), State: state})
}

// notifyQuarantined tells the app that a refresh token handed over (or
// rotated) for q.SubmittedFor was put in the quarantine.
func (n *notifier) notifyQuarantined(q *quarantineRecord) {
	reason := "tenant_mismatch"
	if q.Tenant == q.SubmittedFor && q.Tenant != "" {
		reason = "account_user_mismatch"
	}
	n.emit(notifyQuarantined, Subject{Tenant: q.SubmittedFor, Account: q.Account}, reason, nil)
}
