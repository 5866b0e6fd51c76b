package fortnox

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func intp(n int) *int { return &n }

// The redis option's Caddyfile forms: a URL as before, or a block.
func TestRedisCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    *RedisConfig
		wantErr string
	}{
		{name: "url", input: "redis {env.FORTNOX_REDIS_URL}", want: &RedisConfig{URL: "{env.FORTNOX_REDIS_URL}", short: true}},
		{name: "block url", input: "redis {\n url redis://127.0.0.1:6379/0\n username {env.U}\n password {env.P}\n}",
			want: &RedisConfig{URL: "redis://127.0.0.1:6379/0", Username: "{env.U}", Password: "{env.P}"}},
		{name: "block sentinel", input: "redis {\n sentinel mymaster 10.0.0.1:26379 10.0.0.2:26379\n password {env.P}\n tls\n replica_acks 1\n}",
			want: &RedisConfig{Sentinel: &RedisSentinel{Master: "mymaster", Addrs: []string{"10.0.0.1:26379", "10.0.0.2:26379"}}, Password: "{env.P}", TLS: true, ReplicaAcks: intp(1)}},
		{name: "replica_acks zero", input: "redis {\n sentinel m {env.SENTINELS}\n replica_acks 0\n}",
			want: &RedisConfig{Sentinel: &RedisSentinel{Master: "m", Addrs: []string{"{env.SENTINELS}"}}, ReplicaAcks: intp(0)}},
		{name: "block cluster parses", input: "redis {\n cluster 10.0.0.1:7000 10.0.0.2:7000\n tls\n}",
			want: &RedisConfig{Cluster: []string{"10.0.0.1:7000", "10.0.0.2:7000"}, TLS: true}},
		{name: "nothing", input: "redis", wantErr: "redis needs a URL (redis <url>) or a block"},
		{name: "empty block", input: "redis {\n}", wantErr: "redis needs a URL"},
		{name: "two urls", input: "redis a b", wantErr: "redis takes one URL, or a block"},
		{name: "url and block", input: "redis redis://x:1 {\n tls\n}", wantErr: "redis takes a URL or a block, not both"},
		{name: "url and sentinel", input: "redis {\n url redis://x:1\n sentinel m a:1\n}", wantErr: "url and sentinel are both set; give exactly one of url, sentinel, cluster"},
		{name: "sentinel and cluster", input: "redis {\n sentinel m a:1\n cluster b:2\n}", wantErr: "sentinel and cluster are both set"},
		{name: "none of the three", input: "redis {\n password {env.P}\n}", wantErr: "give one of url, sentinel or cluster"},
		{name: "sentinel without master", input: "redis {\n sentinel\n}", wantErr: "sentinel needs the master's name and the Sentinels' addresses"},
		{name: "sentinel without address", input: "redis {\n sentinel mymaster\n}", wantErr: "sentinel mymaster has no Sentinel address"},
		{name: "cluster without address", input: "redis {\n cluster\n}", wantErr: "cluster needs the nodes' addresses"},
		{name: "url twice", input: "redis {\n url redis://a:1\n url redis://b:1\n}", wantErr: "url is given twice"},
		{name: "redis twice", input: "redis redis://a:1\nredis redis://b:1", wantErr: "redis is given twice"},
		{name: "negative replica_acks", input: "redis {\n sentinel m a:1\n replica_acks -1\n}", wantErr: `replica_acks: "-1" is not a number of replicas`},
		{name: "bad replica_acks", input: "redis {\n sentinel m a:1\n replica_acks all\n}", wantErr: `replica_acks: "all" is not a number`},
		{name: "tls with url", input: "redis {\n url redis://a:1\n tls\n}", wantErr: "use a rediss:// URL"},
		{name: "tls with argument", input: "redis {\n sentinel m a:1\n tls yes\n}", wantErr: "wrong argument count"},
		{name: "unknown option", input: "redis {\n sentinels m a:1\n}", wantErr: `unrecognized option "sentinels"`},
		{name: "password twice on a line", input: "redis {\n sentinel m a:1\n password s3cr3t-value more\n}", wantErr: "password takes exactly one value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("fortnox {\n" + tt.input + "\n}"))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "s3cr3t-value") {
					t.Errorf("the error shows the password: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if !reflect.DeepEqual(h.Redis, tt.want) {
				t.Errorf("got %+v\nwant %+v", h.Redis, tt.want)
			}
		})
	}
}

// `redis <url>` adapts to the string it always did; the block to the
// object form.
func TestRedisAdapt(t *testing.T) {
	adapt := func(redisLines string) map[string]any {
		t.Helper()
		input := ":8080 {\n\troute {\n\t\tfortnox {\n\t\t\tclient_id x\n\t\t\t" + redisLines + "\n\t\t}\n\t}\n}\n"
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			t.Fatalf("adapt: %v", err)
		}
		var found map[string]any
		var walk func(v any)
		walk = func(v any) {
			switch v := v.(type) {
			case map[string]any:
				if v["handler"] == "fortnox" {
					found = v
				}
				for _, x := range v {
					walk(x)
				}
			case []any:
				for _, x := range v {
					walk(x)
				}
			}
		}
		var cfg any
		if err := json.Unmarshal(out, &cfg); err != nil {
			t.Fatal(err)
		}
		walk(cfg)
		if found == nil {
			t.Fatalf("no fortnox handler in %s", out)
		}
		return found
	}
	if got := adapt("redis {env.FORTNOX_REDIS_URL}")["redis"]; got != "{env.FORTNOX_REDIS_URL}" {
		t.Errorf("redis <url> adapts to %#v, want the string", got)
	}
	got, _ := json.Marshal(adapt("redis {\n\t\t\t\tsentinel mymaster 10.0.0.1:26379 10.0.0.2:26379\n\t\t\t\tusername u\n\t\t\t\tpassword {env.P}\n\t\t\t\ttls\n\t\t\t\treplica_acks 1\n\t\t\t}")["redis"])
	if want := `{"password":"{env.P}","replica_acks":1,"sentinel":{"addrs":["10.0.0.1:26379","10.0.0.2:26379"],"master":"mymaster"},"tls":true,"username":"u"}`; string(got) != want {
		t.Errorf("the block adapts to %s\nwant %s", got, want)
	}
	got, _ = json.Marshal(adapt("redis {\n\t\t\t\turl {env.FORTNOX_REDIS_URL}\n\t\t\t}")["redis"])
	if want := `{"url":"{env.FORTNOX_REDIS_URL}"}`; string(got) != want {
		t.Errorf("the url block adapts to %s, want %s", got, want)
	}
}

// JSON: the string form keeps loading, the object form loads, and each is
// written back as it came.
func TestRedisJSON(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want *RedisConfig
	}{
		{`"redis://127.0.0.1:6379/0"`, &RedisConfig{URL: "redis://127.0.0.1:6379/0", short: true}},
		{`{"url":"redis://127.0.0.1:6379/0"}`, &RedisConfig{URL: "redis://127.0.0.1:6379/0"}},
		{`{"password":"{env.P}","replica_acks":1,"sentinel":{"master":"m","addrs":["a:1","b:2"]},"tls":true,"username":"u"}`,
			&RedisConfig{Sentinel: &RedisSentinel{Master: "m", Addrs: []string{"a:1", "b:2"}}, Username: "u", Password: "{env.P}", TLS: true, ReplicaAcks: intp(1)}},
	} {
		var h Handler
		if err := json.Unmarshal([]byte(`{"redis":`+tt.in+`}`), &h); err != nil {
			t.Fatalf("%s: %v", tt.in, err)
		}
		if !reflect.DeepEqual(h.Redis, tt.want) {
			t.Errorf("%s: got %+v, want %+v", tt.in, h.Redis, tt.want)
		}
		out, err := json.Marshal(h.Redis)
		if err != nil {
			t.Fatal(err)
		}
		var a, b any
		_ = json.Unmarshal(out, &a)
		_ = json.Unmarshal([]byte(tt.in), &b)
		if !reflect.DeepEqual(a, b) {
			t.Errorf("%s is written back as %s", tt.in, out)
		}
	}
	var h Handler
	if out, _ := json.Marshal(h); strings.Contains(string(out), "redis") {
		t.Errorf("no redis is written as %s", out)
	}
	for in, wantErr := range map[string]string{
		`{"url":"redis://a:1","sentinal":{}}`: `unknown field "sentinal"`,
		`{"url":1}`:                           "cannot unmarshal number",
		`7`:                                   "a URL string or an object",
	} {
		var h Handler
		if err := json.Unmarshal([]byte(`{"redis":`+in+`}`), &h); err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%s: error %v, want one containing %q", in, err, wantErr)
		}
	}
}

// Provision resolves the setting: its mistakes are named, the password is
// never shown, and the pool key tells settings apart without it.
func TestRedisTarget(t *testing.T) {
	t.Setenv("FORTNOX_TEST_REDIS_PASSWORD", "s3cr3t-value")
	t.Setenv("FORTNOX_TEST_SENTINELS", "127.0.0.1:26379, 127.0.0.1:26380")
	repl := caddy.NewReplacer()
	for _, tt := range []struct {
		name    string
		cfg     RedisConfig
		wantErr string
	}{
		{"url and sentinel", RedisConfig{URL: "redis://a:1", Sentinel: &RedisSentinel{Master: "m", Addrs: []string{"a:1"}}}, "url and sentinel are both set"},
		{"no master", RedisConfig{Sentinel: &RedisSentinel{Addrs: []string{"a:1"}}}, "sentinel has no master name"},
		{"no address", RedisConfig{Sentinel: &RedisSentinel{Master: "m"}}, "sentinel m has no Sentinel address"},
		{"address resolves to nothing", RedisConfig{Sentinel: &RedisSentinel{Master: "m", Addrs: []string{"{env.FORTNOX_TEST_UNSET}"}}}, "no Sentinel address once its placeholders are resolved"},
		{"bad address", RedisConfig{Sentinel: &RedisSentinel{Master: "m", Addrs: []string{"10.0.0.1"}}, Password: "{env.FORTNOX_TEST_REDIS_PASSWORD}"}, `"10.0.0.1" is not a host:port address`},
		{"bad URL", RedisConfig{URL: "http://u:s3cr3t-value@a:1"}, "is not a redis:// or rediss:// URL"},
		{"bad URL, short", *redisURL("redis//u:s3cr3t-value@a:1"), "is not a redis:// or rediss:// URL"},
		{"cluster, bad address", RedisConfig{Cluster: []string{"a:7000", "b"}, Password: "s3cr3t-value"}, `redis cluster: "b" is not a host:port address`},
		{"cluster resolves to nothing", RedisConfig{Cluster: []string{"{env.FORTNOX_TEST_UNSET}"}}, "cluster has no node address once its placeholders are resolved"},
		{"negative replica_acks", RedisConfig{Sentinel: &RedisSentinel{Master: "m", Addrs: []string{"a:1"}}, ReplicaAcks: intp(-1)}, "replica_acks must not be negative"},
		{"password resolves to nothing", RedisConfig{Sentinel: &RedisSentinel{Master: "m", Addrs: []string{"a:1"}}, Password: "{env.FORTNOX_TEST_UNSET}"}, "redis password is empty: its placeholder"},
		{"tls with url", RedisConfig{URL: "redis://a:1", TLS: true}, "use a rediss:// URL"},
	} {
		_, err := tt.cfg.target(repl)
		if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("%s: error %v, want one containing %q", tt.name, err, tt.wantErr)
		} else if strings.Contains(err.Error(), "s3cr3t-value") {
			t.Errorf("%s: the error shows the password: %v", tt.name, err)
		}
	}

	sentinel := func(password string) *redisTarget {
		t.Helper()
		r := RedisConfig{Sentinel: &RedisSentinel{Master: "mymaster", Addrs: []string{"{env.FORTNOX_TEST_SENTINELS}", "127.0.0.1:26381"}}, Username: "fortnox", Password: password, TLS: true}
		tg, err := r.target(repl)
		if err != nil {
			t.Fatal(err)
		}
		return tg
	}
	a, b, c := sentinel("{env.FORTNOX_TEST_REDIS_PASSWORD}"), sentinel("s3cr3t-value"), sentinel("another")
	if want := "sentinel mymaster 127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381 user fortnox password xxxxx tls"; a.name != want {
		t.Errorf("name %q, want %q", a.name, want)
	}
	if a.secrets != b.secrets || a.secrets == c.secrets || a.secrets == "" {
		t.Errorf("secret tags %q %q %q: the same password must match, another must not", a.secrets, b.secrets, c.secrets)
	}
	for _, tg := range []*redisTarget{a, b, c} {
		if strings.Contains(tg.name+tg.secrets, "s3cr3t-value") {
			t.Errorf("the pool key shows the password: %q", tg.name+tg.secrets)
		}
	}
	cl, err := (&RedisConfig{Cluster: []string{"{env.FORTNOX_TEST_SENTINELS}", "127.0.0.1:7002"}, Password: "s3cr3t-value", TLS: true}).target(repl)
	if err != nil {
		t.Fatal(err)
	}
	if want := "cluster 127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:7002 password xxxxx tls"; cl.name != want || cl.secrets != a.secrets {
		t.Errorf("cluster: name %q (want %q), secret tag %q (want %q)", cl.name, want, cl.secrets, a.secrets)
	}
	// replica_acks is its own connection: another pool key.
	acks, err := (&RedisConfig{Cluster: []string{"{env.FORTNOX_TEST_SENTINELS}", "127.0.0.1:7002"}, Password: "s3cr3t-value", TLS: true, ReplicaAcks: intp(1)}).target(repl)
	if err != nil {
		t.Fatal(err)
	}
	if want := cl.name + " replica_acks 1"; acks.name != want {
		t.Errorf("with replica_acks: name %q, want %q", acks.name, want)
	}
	u, err := (&RedisConfig{URL: "redis://fortnox:s3cr3t-value@127.0.0.1:6379/0"}).target(repl)
	if err != nil {
		t.Fatal(err)
	}
	if want := "redis://fortnox:xxxxx@127.0.0.1:6379/0"; u.name != want || u.secrets != a.secrets {
		t.Errorf("url: name %q (want %q), secret tag %q (want %q)", u.name, want, u.secrets, a.secrets)
	}
}
