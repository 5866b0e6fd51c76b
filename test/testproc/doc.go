// Package testproc starts and stops what the multi-process tests run beside
// the code under test, all on 127.0.0.1: redis-server (alone, as a primary
// with a replica and three Sentinels, or as a three-node Redis Cluster),
// Caddy or any other command, the fake Fortnox, and a TCP relay that a test
// can cut. It also holds the small pieces those tests share: free ports,
// polling with a deadline, and skipping (or, in CI, failing) when a binary
// is missing.
//
// Two kinds of function:
//
//   - those that take a testing.TB (FreePort, WaitFor, Start, StartRedis,
//     StartSentinel, StartCluster, StartRelay, StartFake) fail the test when
//     something does not work, and stop what they started in t.Cleanup;
//   - their error-returning variants (PickPort, Poll, Launch, LaunchRedis,
//     NewRelay) take no testing.TB and leave stopping to the caller, for
//     test/bench, a command, and for a test that stops a process itself.
//
// A missing binary skips the test, or fails it in CI (see InCI); a package
// whose tests need one should call CheckBinaries from its TestMain, so that
// the skip is seen.
package testproc
