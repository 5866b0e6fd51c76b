package tokens

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
)

// Where notifications wait: Caddy's storage without `redis`, Redis in
// cluster mode. Neither holds a token or a secret (an event names a
// tenant, an account and a reason), so they are stored in plain JSON,
// under their own prefix beside the token records.

// storageNotes keeps claims and pending events in Caddy's storage:
//
//	fortnox-notify/<client_id>/pending/<id>.json   an event not delivered yet
//	fortnox-notify/<client_id>/claims/<claim key>  the state the app was last told of
type storageNotes struct {
	clock    *clock.Clock
	storage  Storage
	clientID string
}

func (s *storageNotes) prefix() string {
	return "fortnox-notify/" + url.PathEscape(s.clientID) + "/"
}

func (s *storageNotes) pendingDir() string { return s.prefix() + "pending" }

func (s *storageNotes) pendingKey(id string) string { return s.pendingDir() + "/" + id + ".json" }

func (s *storageNotes) claimPath(key string) string { return s.prefix() + "claims/" + key }

func (s *storageNotes) store(ctx context.Context, ev *PendingEvent) error {
	raw, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	return s.storage.Store(ctx, s.pendingKey(ev.ID), raw)
}

func (s *storageNotes) Enqueue(ctx context.Context, claim *NotifyClaim, ev *PendingEvent) (bool, error) {
	if claim == nil {
		return true, s.store(ctx, ev)
	}
	path := s.claimPath(claim.Key)
	if err := s.storage.Lock(ctx, path); err != nil {
		return false, err
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = s.storage.Unlock(uctx, path)
	}()
	last, err := s.storage.Load(ctx, path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return false, err
	case string(last) == claim.State:
		return false, nil
	}
	// The event first: a crash between the two writes tells the app
	// twice rather than never.
	if err := s.store(ctx, ev); err != nil {
		return false, err
	}
	return true, s.storage.Store(ctx, path, []byte(claim.State))
}

func (s *storageNotes) Release(ctx context.Context, key string) error {
	err := s.storage.Delete(ctx, s.claimPath(key))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func (s *storageNotes) load(ctx context.Context, key string) (*PendingEvent, error) {
	raw, err := s.storage.Load(ctx, key)
	if err != nil {
		return nil, err
	}
	var ev PendingEvent
	if err := json.Unmarshal(raw, &ev); err != nil || !ValidNotificationID(ev.ID) || ev.Body == "" {
		return nil, errors.New("unreadable pending notification " + key)
	}
	return &ev, nil
}

// Take reads the pending events and leases those due, each under its own
// storage lock, so that processes sharing the storage deliver each once.
func (s *storageNotes) Take(ctx context.Context, n, until time.Time, max int) ([]*PendingEvent, error) {
	keys, err := s.storage.List(ctx, s.pendingDir(), false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	sort.Strings(keys)
	var out []*PendingEvent
	for _, key := range keys {
		if len(out) == max {
			break
		}
		id, ok := strings.CutSuffix(key[strings.LastIndexByte(key, '/')+1:], ".json")
		if !ok || !ValidNotificationID(id) {
			continue
		}
		if ev, err := s.load(ctx, key); err != nil || !dueAt(ev, n) {
			continue
		}
		ev, err := s.lease(ctx, key, n, until)
		if err != nil {
			return out, err
		}
		if ev != nil {
			out = append(out, ev)
		}
	}
	return out, nil
}

func dueAt(ev *PendingEvent, n time.Time) bool {
	return !n.Before(ev.NextAt) && !n.Before(ev.LeaseUntil)
}

// lease takes one event under its lock: nil when another took it first.
func (s *storageNotes) lease(ctx context.Context, key string, n, until time.Time) (*PendingEvent, error) {
	if err := s.storage.Lock(ctx, key); err != nil {
		return nil, err
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = s.storage.Unlock(uctx, key)
	}()
	ev, err := s.load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil || !dueAt(ev, n) {
		return nil, nil
	}
	ev.LeaseUntil = until
	if err := s.store(ctx, ev); err != nil {
		return nil, err
	}
	return ev, nil
}

func (s *storageNotes) Done(ctx context.Context, ev *PendingEvent) error {
	err := s.storage.Delete(ctx, s.pendingKey(ev.ID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func (s *storageNotes) Later(ctx context.Context, ev *PendingEvent) error {
	return s.store(ctx, ev)
}

// NotifyEventTTL: an event the store keeps outlives the day it is tried.
const NotifyEventTTL = notifyGiveUp + time.Hour

var (
	_ NotifyStore = (*storageNotes)(nil)
)
