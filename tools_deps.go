package fortnox

import (
	_ "github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/patrickmn/go-cache"
	_ "golang.org/x/oauth2"
	_ "golang.org/x/sync/singleflight"
	_ "github.com/redis/go-redis/v9"
	_ "github.com/bsm/redislock"
)
