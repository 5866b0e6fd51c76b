package fortnox

// redisShared is the seam to a cluster of sidecars through Redis.
type redisShared struct {
	*localShared
}
