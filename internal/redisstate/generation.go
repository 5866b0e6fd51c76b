package redisstate

import "sync"

// A tenant's generation counts the changes of its shared state that the
// other sidecars must see: a token dropped after a 401 or through the admin
// API, a new refresh token stored, an account deleted, a consent revoked
// or given. Every event a sidecar publishes bumps it in the same round
// trip (Backend.Publish), after the change itself is in the store. The
// limiter's turn script reads it with the pause (one MGET, no round trip
// of its own) and answers it with the turn; a sidecar that meets a
// generation it has not seen revalidates the tenant against the store
// before the request uses its token. Pub/sub is the fast path: a sidecar
// that missed a message (a link dropped, a message lost) notices on its
// next request for the tenant. Without rate_limit there is no turn, and
// the Resync after a reconnect is what covers it.
//
// The key is named from the limiter's key base (the log key +
// ":generation"), so that it stays in the log's hash slot.

// generationKey is the tenant's generation key.
func generationKey(c *Conn, tenant string) string { return (&Limiter{c: c}).keys(tenant)[2] }

// generations is the last generation of each tenant this sidecar has
// seen (tenant → int64).
type generations struct{ seen sync.Map }

// turnSaw handles the generation a turn answered for tenant: when it is
// news, the owner revalidates the tenant before the request goes on. A
// tenant met for the first time is revalidated only if its generation is
// not 0 (it changed since it was first shared): what this sidecar holds
// may predate the change. Concurrent requests that meet the same news may
// each revalidate: it is idempotent, and rare.
func (c *Conn) turnSaw(tenant string, gen int64) {
	g := &c.backend.generations
	v, known := g.seen.Load(tenant)
	if known && v.(int64) == gen {
		return
	}
	if known || gen != 0 {
		c.owner.RevalidateTenant(tenant)
	}
	g.seen.Store(tenant, gen)
}

// bumped notes this sidecar's own bump of tenant's generation to gen: if
// it had seen the one before, it has seen this one (it made the change),
// and its next turn does not revalidate for nothing.
func (g *generations) bumped(tenant string, gen int64) {
	g.seen.CompareAndSwap(tenant, gen-1, gen)
}
