package tokens

import (
	"context"
	"errors"
	"io/fs"
	"strings"
	"time"

	"go.uber.org/zap"
)

// Copying records between Caddy's storage and Redis, still encrypted (a
// record's cipher is bound to its key, which is the same in both):
// POST /fortnox/export copies what Redis holds into Caddy's storage (a
// backup, or the way back from cluster mode); POST /fortnox/import copies
// what Caddy's storage holds into Redis and leaves tombstones. `caddy
// fortnox export` and `caddy fortnox import` call them.

// transferResult is what an export or import did.
type transferResult struct {
	Copied  []string `json:"copied"`
	Skipped []string `json:"skipped"` // already in Redis (import without overwrite), or tombstones
	Failed  []string `json:"failed"`
}

// transferStores returns both stores of a cluster-mode manager.
func (o Ops) transferStores() (Migrating, error) {
	rs, err := o.Records()
	if err != nil {
		return nil, err
	}
	mr, ok := rs.Storage.(Migrating)
	if !ok || mr.OldRecords() == nil {
		return nil, opErrorf(OpInvalid, "not_cluster_mode", "this sidecar has no `redis` line: its records are in Caddy's storage already, there is nothing to export or import")
	}
	return mr, nil
}

// ExportRecords copies every record of the client from Redis to Caddy's
// storage, replacing what is there (tombstones included).
func (o Ops) ExportRecords(ctx context.Context) (*transferResult, error) {
	m := o.m
	mr, err := o.transferStores()
	if err != nil {
		return nil, err
	}
	keys, err := mr.SharedRecords().List(ctx, strings.TrimSuffix(RecordPrefix(m.clientID), "/"), true)
	if err != nil {
		return nil, opErrorf(OpUnavailable, "redis_unavailable", "listing the records in Redis: %v", err)
	}
	res := &transferResult{Copied: []string{}, Skipped: []string{}, Failed: []string{}}
	for _, key := range keys {
		raw, err := mr.SharedRecords().Load(ctx, key)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err == nil {
			err = mr.OldRecords().Store(ctx, key, raw)
		}
		if err != nil {
			res.Failed = append(res.Failed, key+": "+(&ScrubbedError{err}).Error())
			continue
		}
		res.Copied = append(res.Copied, key)
	}
	m.Logger().Info("records exported from Redis to Caddy's storage", zap.Int("copied", len(res.Copied)), zap.Int("failed", len(res.Failed)))
	return res, nil
}

// ImportRecords copies every record of the client still in Caddy's storage
// into Redis (not over a record Redis has, unless overwrite), and leaves a
// tombstone for each.
func (o Ops) ImportRecords(ctx context.Context, overwrite bool) (*transferResult, error) {
	m := o.m
	mr, err := o.transferStores()
	if err != nil {
		return nil, err
	}
	keys, err := mr.OldRecords().List(ctx, strings.TrimSuffix(RecordPrefix(m.clientID), "/"), true)
	if errors.Is(err, fs.ErrNotExist) {
		keys, err = nil, nil
	}
	if err != nil {
		return nil, opErrorf(OpStorage, "token_storage_unavailable", "listing the records in Caddy's storage: %v", &ScrubbedError{err})
	}
	res := &transferResult{Copied: []string{}, Skipped: []string{}, Failed: []string{}}
	for _, key := range keys {
		if !strings.HasSuffix(key, ".json") {
			continue // a folder
		}
		raw, err := mr.OldRecords().Load(ctx, key)
		if err != nil {
			res.Failed = append(res.Failed, key+": "+(&ScrubbedError{err}).Error())
			continue
		}
		if _, dead := IsTombstone(raw); dead {
			res.Skipped = append(res.Skipped, key)
			continue
		}
		stored := true
		if overwrite {
			err = mr.SharedRecords().Store(ctx, key, raw)
		} else {
			stored, err = mr.StoreIfAbsent(ctx, key, raw)
		}
		if err != nil {
			res.Failed = append(res.Failed, key+": "+err.Error())
			continue
		}
		if !stored {
			res.Skipped = append(res.Skipped, key)
			continue
		}
		res.Copied = append(res.Copied, key)
	}
	for _, key := range res.Copied {
		stone := []byte(`{"moved_to":"redis","moved_at":"` + m.clock.Now().UTC().Format(time.RFC3339) + `"}`)
		if err := mr.OldRecords().Store(ctx, key, stone); err != nil {
			m.Logger().Warn("a record was imported into Redis, but its tombstone could not be written", zap.String("key", key), zap.Error(&ScrubbedError{err}))
		}
	}
	m.Logger().Info("records imported from Caddy's storage into Redis", zap.Int("copied", len(res.Copied)), zap.Int("skipped", len(res.Skipped)), zap.Int("failed", len(res.Failed)))
	return res, nil
}
