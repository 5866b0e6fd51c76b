package redisstate

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// SentinelConfig is a primary that Sentinel watches: the master's name,
// the Sentinels' host:port addresses, and how to reach the data nodes.
type SentinelConfig struct {
	Master   string
	Addrs    []string
	Username string // for the data nodes (the Sentinels are asked without)
	Password string // for the data nodes
	TLS      bool   // to the Sentinels and the data nodes
}

// FailoverOptions checks a Sentinel setting without connecting and returns
// the options of a failover client (redis.NewFailoverClient), every call
// bounded as ParseRedisURL bounds it. Its errors never hold the password.
func FailoverOptions(cfg SentinelConfig) (*redis.FailoverOptions, error) {
	if strings.TrimSpace(cfg.Master) == "" {
		return nil, errors.New("redis sentinel: no master name (sentinel <master> <host:port>...)")
	}
	if len(cfg.Addrs) == 0 {
		return nil, fmt.Errorf("redis sentinel %s: no Sentinel address (sentinel <master> <host:port>...)", cfg.Master)
	}
	for _, a := range cfg.Addrs {
		if err := checkAddr(a); err != nil {
			return nil, fmt.Errorf("redis sentinel %s: %v", cfg.Master, err)
		}
	}
	opts := &redis.FailoverOptions{
		MasterName:    cfg.Master,
		SentinelAddrs: append([]string(nil), cfg.Addrs...),
		Username:      cfg.Username,
		Password:      cfg.Password,
		DialTimeout:   dialTimeout,
		ReadTimeout:   ioTimeout,
		WriteTimeout:  ioTimeout,
		PoolTimeout:   poolTimeout,
		MaxRetries:    maxRetries,
	}
	if cfg.TLS {
		opts.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return opts, nil
}

// RedactSentinel names a Sentinel setting in logs and in the glue's pool
// key: the master, the addresses, the user and TLS, never the password.
func RedactSentinel(cfg SentinelConfig) string {
	return "sentinel " + cfg.Master + " " + strings.Join(cfg.Addrs, ",") + RedactLogin(cfg.Username, cfg.Password, cfg.TLS)
}

// RedactLogin is how a setting logs in: its user, that it has a password
// (never which), and TLS.
func RedactLogin(user, password string, tls bool) string {
	var s string
	if user != "" {
		s += " user " + user
	}
	if password != "" {
		s += " password xxxxx"
	}
	if tls {
		s += " tls"
	}
	return s
}

// ClusterConfig is a Redis Cluster: its seed nodes' host:port addresses
// (any of them; the client learns the others) and how to log in.
type ClusterConfig struct {
	Addrs    []string
	Username string
	Password string
	TLS      bool
}

// ClusterOptions checks a Cluster setting without connecting and returns
// the options of a cluster client (redis.NewClusterClient), every call
// bounded as ParseRedisURL bounds it. Its errors never hold the password.
func ClusterOptions(cfg ClusterConfig) (*redis.ClusterOptions, error) {
	if len(cfg.Addrs) == 0 {
		return nil, errors.New("redis cluster: no node address (cluster <host:port>...)")
	}
	for _, a := range cfg.Addrs {
		if err := checkAddr(a); err != nil {
			return nil, fmt.Errorf("redis cluster: %v", err)
		}
	}
	opts := &redis.ClusterOptions{
		Addrs:        append([]string(nil), cfg.Addrs...),
		Username:     cfg.Username,
		Password:     cfg.Password,
		DialTimeout:  dialTimeout,
		ReadTimeout:  ioTimeout,
		WriteTimeout: ioTimeout,
		PoolTimeout:  poolTimeout,
		// A MOVED or ASK answer (a slot migrating, a failover) is followed
		// once more than a plain retry.
		MaxRedirects: 3,
		MaxRetries:   maxRetries,
	}
	if cfg.TLS {
		opts.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return opts, nil
}

// RedactCluster names a Cluster setting in logs and in the glue's pool
// key: the addresses, the user and TLS, never the password.
func RedactCluster(cfg ClusterConfig) string {
	return "cluster " + strings.Join(cfg.Addrs, ",") + RedactLogin(cfg.Username, cfg.Password, cfg.TLS)
}

// checkAddr checks a host:port address.
func checkAddr(a string) error {
	host, port, err := net.SplitHostPort(a)
	if n, perr := strconv.Atoi(port); err != nil || host == "" || perr != nil || n < 1 || n > 65535 {
		return fmt.Errorf("%q is not a host:port address", a)
	}
	return nil
}
