package fortnox

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/caddy-fortnox/caddy-fortnox/test/testproc"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"gopkg.in/yaml.v3"
)

// Docker cannot run in CI. These tests keep the image and the Kubernetes
// example honest instead: the Dockerfile builds with the command CI runs,
// the build context holds what that command needs, and the example is
// valid YAML whose pieces fit the image and each other.

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestDockerfileBuildsWithXcaddySh(t *testing.T) {
	df := readFile(t, "Dockerfile")
	for _, want := range []string{
		"RUN go install github.com/caddyserver/xcaddy/cmd/xcaddy@", // xcaddy in the builder stage
		"RUN XCADDY=1 OUTPUT=/out/caddy ./xcaddy.sh",               // the build: what .ci/run runs, with xcaddy
		"FROM golang:1.26",        // the Go of go.mod (below)
		"USER nonroot",            // not root
		"VOLUME /data",            // Caddy's storage
		"ENV XDG_DATA_HOME=/data", // ... is where Caddy puts it
		`"--config", "/etc/caddy/Caddyfile"`,
		// The admin socket's directory, made in the build stage (the
		// runtime image has no shell), 0700 and the image user's; and
		// CADDY_ADMIN, which the image's Caddyfile and `caddy fortnox` read.
		"RUN install -d -m 0700 /out/run/caddy-fortnox",
		"COPY --from=build --chown=nonroot:nonroot /out/run/ /run/",
		"ENV CADDY_ADMIN=" + imageAdminSocket + "\n",
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	ci := readFile(t, ".ci/run")
	if !regexp.MustCompile(`(?m)^XCADDY=1 \./xcaddy\.sh$`).MatchString(ci) {
		t.Error(".ci/run no longer runs XCADDY=1 ./xcaddy.sh: CI would not prove the Dockerfile's build")
	}
	if !regexp.MustCompile(`(?m)^XCADDY=0 OUTPUT=\S+ \./xcaddy\.sh$`).MatchString(ci) {
		t.Error(".ci/run no longer builds with the go build fallback (XCADDY=0 OUTPUT=... ./xcaddy.sh)")
	}
	if !strings.Contains(readFile(t, "go.mod"), "\ngo 1.26") {
		t.Error("go.mod's Go version no longer matches the Dockerfile's golang:1.26")
	}
	// Both builds are checked for the plugin's five modules.
	sh := readFile(t, "xcaddy.sh")
	loop := regexp.MustCompile(`(?m)^for m in (.+); do$`).FindStringSubmatch(sh)
	if loop == nil || strings.Join(strings.Fields(loop[1]), " ") != "http.handlers.fortnox http.handlers.fortnox_connect http.handlers.fortnox_webhook http.handlers.fortnox_handover admin.api.fortnox" {
		t.Errorf("xcaddy.sh does not check that the binary lists the five modules: %q", loop)
	}
}

// CI and the image build with the same xcaddy, at a pinned version.
func TestXcaddyPinnedAlike(t *testing.T) {
	ci := readFile(t, ".ci/run")
	pinned := regexp.MustCompile(`(?m)^xcaddy_version=(v\d+\.\d+\.\d+)\b`).FindStringSubmatch(ci)
	if pinned == nil {
		t.Fatal(".ci/run pins no xcaddy version (xcaddy_version=vX.Y.Z)")
	}
	if !strings.Contains(ci, `go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$xcaddy_version"`) {
		t.Error(".ci/run does not install xcaddy at $xcaddy_version")
	}
	if want := "RUN go install github.com/caddyserver/xcaddy/cmd/xcaddy@" + pinned[1] + "\n"; !strings.Contains(readFile(t, "Dockerfile"), want) {
		t.Errorf("the Dockerfile does not install the xcaddy .ci/run installs (%s)", pinned[1])
	}
}

// The README's "add it to your own Caddy" line is what CI builds with:
// xcaddy.sh runs that line, plus the Caddy version of go.mod, an output
// path, and this checkout in place of the module (@v0.0.0=.).
func TestReadmeXcaddyLineIsWhatCIRuns(t *testing.T) {
	module := regexp.MustCompile(`(?m)^module (\S+)$`).FindStringSubmatch(readFile(t, "go.mod"))[1]
	readmeLines := regexp.MustCompile("(?m)^xcaddy build .*$").FindAllString(readFile(t, "README.md"), -1)
	if len(readmeLines) != 1 {
		t.Fatalf("README.md has %d `xcaddy build` lines, want 1: %q", len(readmeLines), readmeLines)
	}
	if want := "xcaddy build --with " + module; readmeLines[0] != want {
		t.Errorf("README.md shows %q, want %q", readmeLines[0], want)
	}

	shLines := regexp.MustCompile(`(?m)^\s*xcaddy build .*$`).FindAllString(readFile(t, "xcaddy.sh"), -1)
	if len(shLines) != 1 {
		t.Fatalf("xcaddy.sh has %d `xcaddy build` lines, want 1: %q", len(shLines), shLines)
	}
	ci := strings.Fields(shLines[0])
	var rest []string
	for i := 0; i < len(ci); i++ {
		switch {
		case ci[i] == `"$caddy_version"`: // go.mod's Caddy version
		case ci[i] == "--output" && i+1 < len(ci) && ci[i+1] == `"$output"`:
			i++
		case strings.HasSuffix(ci[i], "@v0.0.0=."): // this checkout in place of the module
			rest = append(rest, strings.TrimSuffix(ci[i], "@v0.0.0=."))
		default:
			rest = append(rest, ci[i])
		}
	}
	if got := strings.Join(rest, " "); got != readmeLines[0] {
		t.Errorf("xcaddy.sh runs %q, which is README.md's %q only with other arguments: keep them the same", shLines[0], readmeLines[0])
	}
	if !strings.Contains(readFile(t, "xcaddy.sh"), "go list -m -f '{{.Version}}' github.com/caddyserver/caddy/v2") {
		t.Error(`xcaddy.sh's "$caddy_version" no longer comes from go.mod`)
	}
}

// The flags xcaddy v0.4.5 passes to go build, in its builder.go.
const xcaddyDefaultFlags = `"-ldflags", "-w -s", // trim debug symbols
				"-trimpath",
				"-tags", "nobadger,nomysql,nopgx",`

// Every Caddy build CI makes uses the same flags and cgo setting, so that
// Caddy's packages compile once: xcaddy (its defaults), xcaddy.sh's
// go build fallback, and the multi-process tests' binary (test/caddybin).
func TestBuildFlagsAgree(t *testing.T) {
	sh := readFile(t, "xcaddy.sh")
	arr := regexp.MustCompile(`(?m)^go_build_flags=\((.*)\)$`).FindStringSubmatch(sh)
	if arr == nil {
		t.Fatal("xcaddy.sh has no go_build_flags=(...) line")
	}
	shFlags := shellWords(arr[1])
	if !strings.Contains(sh, `export CGO_ENABLED="${CGO_ENABLED:-0}"`) || !strings.Contains(sh, `go build "${go_build_flags[@]}"`) {
		t.Error("xcaddy.sh's fallback no longer builds with go_build_flags and CGO_ENABLED=0 (xcaddy's default)")
	}

	const caddybin = "test/caddybin/caddybin.go" // test/replicas' and test/cluster's builds
	binSrc := readFile(t, caddybin)
	lit := regexp.MustCompile(`(?m)^var BuildFlags = \[\]string\{(.*)\}$`).FindStringSubmatch(binSrc)
	if lit == nil {
		t.Fatalf("%s has no BuildFlags = []string{...} line", caddybin)
	}
	var goFlags []string
	for _, q := range regexp.MustCompile(`"(?:[^"\\]|\\.)*"`).FindAllString(lit[1], -1) {
		s, err := strconv.Unquote(q)
		if err != nil {
			t.Fatal(err)
		}
		goFlags = append(goFlags, s)
	}
	if !slices.Equal(shFlags, goFlags) {
		t.Errorf("xcaddy.sh builds with %q, %s with %q: Caddy would compile twice", shFlags, caddybin, goFlags)
	}
	if !strings.Contains(binSrc, `"CGO_ENABLED=0"`) {
		t.Errorf("%s does not build with CGO_ENABLED=0, as xcaddy.sh does", caddybin)
	}
	for _, user := range []string{"test/replicas/replicas_test.go", "test/cluster/harness_test.go"} {
		if !strings.Contains(readFile(t, user), "caddybin.Build(") {
			t.Errorf("%s no longer builds Caddy with caddybin.Build: its flags are not checked", user)
		}
	}
	if want := []string{"-ldflags", "-w -s", "-trimpath", "-tags", "nobadger,nomysql,nopgx"}; !slices.Equal(shFlags, want) {
		t.Errorf("xcaddy.sh builds with %q; xcaddy v0.4.5 builds with %q", shFlags, want)
	}

	// xcaddy's own source, in the module cache once .ci/run installed it.
	out, err := exec.Command("go", "env", "GOMODCACHE").Output()
	if err != nil {
		t.Fatal(err)
	}
	builder := filepath.Join(strings.TrimSpace(string(out)), "github.com/caddyserver/xcaddy@v0.4.5", "builder.go")
	src, err := os.ReadFile(builder)
	switch {
	case err != nil && testproc.InCI():
		t.Errorf("%v: .ci/run installs xcaddy v0.4.5, whose flags this test compares", err)
	case err != nil:
		t.Logf("not compared with xcaddy's source (%v); .ci/run installs it", err)
	case !strings.Contains(string(src), xcaddyDefaultFlags):
		t.Errorf("%s no longer passes %s to go build: align xcaddy.sh and test/caddybin", builder, xcaddyDefaultFlags)
	}
}

// shellWords splits a bash array's body: words, with "double quotes".
func shellWords(s string) []string {
	var words []string
	for _, m := range regexp.MustCompile(`"([^"]*)"|(\S+)`).FindAllStringSubmatch(s, -1) {
		words = append(words, m[1]+m[2])
	}
	return words
}

// .dockerignore must not leave out what the build stage needs.
func TestDockerignoreKeepsTheBuildInputs(t *testing.T) {
	var patterns []string
	for _, line := range strings.Split(readFile(t, ".dockerignore"), "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			patterns = append(patterns, strings.TrimPrefix(line, "/"))
		}
	}
	needed := []string{"go.mod", "go.sum", "xcaddy.sh", "module.go", "cmd/caddy/main.go", "Caddyfile.example"}
	for _, path := range needed {
		if _, err := os.Stat(path); err != nil {
			t.Errorf("%s: %v", path, err)
		}
		for _, p := range patterns {
			// Docker matches a pattern against the path and its parents.
			for dir := path; dir != "." && dir != "/"; dir = filepath.Dir(dir) {
				if ok, _ := filepath.Match(p, dir); ok {
					t.Errorf(".dockerignore pattern %q leaves out %s", p, path)
				}
			}
		}
	}
}

// The parts of Kubernetes objects the example must get right.
type k8sObject struct {
	Kind     string `yaml:"kind"`
	Metadata struct {
		Name string `yaml:"name"`
	} `yaml:"metadata"`
	Data       map[string]string `yaml:"data"`
	StringData map[string]string `yaml:"stringData"`
	Spec       struct {
		AccessModes []string `yaml:"accessModes"`
		Template    struct {
			Metadata struct {
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"metadata"`
			Spec k8sPodSpec `yaml:"spec"`
		} `yaml:"template"`
		// NetworkPolicy
		PodSelector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"podSelector"`
		PolicyTypes []string `yaml:"policyTypes"`
		Ingress     []struct {
			From []struct {
				PodSelector *struct {
					MatchLabels map[string]string `yaml:"matchLabels"`
				} `yaml:"podSelector"`
				NamespaceSelector map[string]any `yaml:"namespaceSelector"`
				IPBlock           map[string]any `yaml:"ipBlock"`
			} `yaml:"from"`
			Ports []struct {
				Port int `yaml:"port"`
			} `yaml:"ports"`
		} `yaml:"ingress"`
		VolumeClaimTemplates []struct {
			Spec struct {
				AccessModes []string `yaml:"accessModes"`
			} `yaml:"spec"`
		} `yaml:"volumeClaimTemplates"`
	} `yaml:"spec"`
}

type k8sPort struct {
	Name          string `yaml:"name"`
	ContainerPort int    `yaml:"containerPort"`
}

type k8sPodSpec struct {
	SecurityContext struct {
		RunAsNonRoot bool `yaml:"runAsNonRoot"`
		FSGroup      int  `yaml:"fsGroup"`
	} `yaml:"securityContext"`
	InitContainers []k8sContainer `yaml:"initContainers"`
	Containers     []k8sContainer `yaml:"containers"`
	Volumes        []struct {
		Name      string         `yaml:"name"`
		ConfigMap map[string]any `yaml:"configMap"`
		PVC       map[string]any `yaml:"persistentVolumeClaim"`
		EmptyDir  map[string]any `yaml:"emptyDir"`
	} `yaml:"volumes"`
}

type k8sContainer struct {
	Name          string    `yaml:"name"`
	RestartPolicy string    `yaml:"restartPolicy"`
	Args          []string  `yaml:"args"`
	EnvFrom       []any     `yaml:"envFrom"`
	Ports         []k8sPort `yaml:"ports"`
	Env           []struct {
		Name      string `yaml:"name"`
		Value     string `yaml:"value"`
		ValueFrom struct {
			SecretKeyRef map[string]string `yaml:"secretKeyRef"`
		} `yaml:"valueFrom"`
	} `yaml:"env"`
	VolumeMounts []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
	} `yaml:"volumeMounts"`
	StartupProbe   map[string]any `yaml:"startupProbe"`
	LivenessProbe  map[string]any `yaml:"livenessProbe"`
	ReadinessProbe map[string]any `yaml:"readinessProbe"`
	Resources      struct {
		Requests map[string]string `yaml:"requests"`
		Limits   map[string]string `yaml:"limits"`
	} `yaml:"resources"`
	SecurityContext struct {
		AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
		ReadOnlyRootFilesystem   bool  `yaml:"readOnlyRootFilesystem"`
	} `yaml:"securityContext"`
}

func TestKubernetesExample(t *testing.T) {
	f, err := os.Open("deploy/kubernetes/sidecar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(false)
	kinds := map[string]k8sObject{}
	for {
		var obj k8sObject
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("YAML: %v", err)
		}
		kinds[obj.Kind+"/"+obj.Metadata.Name] = obj
	}
	for _, k := range []string{"Secret/fortnox-credentials", "ConfigMap/fortnox-sidecar", "ConfigMap/fortnox-redis", "Service/fortnox-redis", "StatefulSet/fortnox-redis", "NetworkPolicy/fortnox-redis", "Deployment/my-fortnox-app"} {
		if _, ok := kinds[k]; !ok {
			t.Errorf("no %s", k)
		}
	}

	// The Caddyfile: adapts, keeps the proxy on loopback, takes its
	// secrets from the environment, and shares the cluster's state
	// through Redis.
	caddyfile := kinds["ConfigMap/fortnox-sidecar"].Data["Caddyfile"]
	if _, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"}); err != nil {
		t.Errorf("the ConfigMap's Caddyfile does not adapt: %v", err)
	}
	for _, want := range []string{"bind 127.0.0.1", "{env.FORTNOX_CLIENT_ID}", "{env.FORTNOX_CLIENT_SECRET}", "{env.FORTNOX_STORAGE_KEY}",
		"redis redis://:{env.FORTNOX_REDIS_PASSWORD}@fortnox-redis:6379/0", "storage file_system /data/", "admin " + imageAdminSocket} {
		if !strings.Contains(caddyfile, want) {
			t.Errorf("the ConfigMap's Caddyfile lacks %q", want)
		}
	}
	// Redis keeps the only copy of rotated refresh tokens: AOF, fsynced on
	// every write, on a persistent volume.
	conf := kinds["ConfigMap/fortnox-redis"].Data["redis.conf"]
	for _, want := range []string{"appendonly yes", "appendfsync always", "dir /data", "protected-mode yes"} {
		if !regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(want) + `\s*$`).MatchString(conf) {
			t.Errorf("redis.conf lacks %q", want)
		}
	}
	if strings.Contains(conf, "protected-mode no") || strings.Contains(conf, "requirepass") {
		t.Error("redis.conf turns protected mode off, or holds the password (it comes from the Secret)")
	}
	if claims := kinds["StatefulSet/fortnox-redis"].Spec.VolumeClaimTemplates; len(claims) != 1 {
		t.Error("Redis has no persistent volume for its append-only file")
	}

	pod := kinds["Deployment/my-fortnox-app"].Spec.Template.Spec
	if !pod.SecurityContext.RunAsNonRoot || pod.SecurityContext.FSGroup != 65532 {
		t.Error("the pod must run as non-root with the image's group (65532) owning the volume")
	}
	var sidecar *k8sContainer
	for i, c := range pod.InitContainers {
		if c.Name == "fortnox-sidecar" {
			sidecar = &pod.InitContainers[i]
		}
	}
	if sidecar == nil {
		t.Fatal("no fortnox-sidecar among the init containers")
	}
	if sidecar.RestartPolicy != "Always" {
		t.Error("the sidecar must be a native sidecar (restartPolicy: Always) so the app starts after it and stops before it")
	}
	if len(pod.Containers) == 0 {
		t.Error("no app container")
	}
	secrets := map[string]bool{}
	for _, e := range sidecar.Env {
		if e.Value != "" {
			t.Errorf("env %s has a literal value; secrets come from the Secret", e.Name)
		}
		if e.ValueFrom.SecretKeyRef["name"] == "fortnox-credentials" {
			secrets[e.Name] = true
		}
	}
	for _, name := range []string{"FORTNOX_CLIENT_ID", "FORTNOX_CLIENT_SECRET", "FORTNOX_STORAGE_KEY", "FORTNOX_REDIS_PASSWORD"} {
		if !secrets[name] {
			t.Errorf("%s does not come from the Secret", name)
		}
	}
	mounts := map[string]string{}
	for _, m := range sidecar.VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	if mounts["/etc/caddy"] == "" || mounts["/data"] == "" {
		t.Errorf("the sidecar mounts %v; it needs /etc/caddy (the Caddyfile) and /data (the image's storage volume)", mounts)
	}
	if sidecar.StartupProbe == nil || sidecar.LivenessProbe == nil || sidecar.ReadinessProbe == nil {
		t.Error("the sidecar needs startup, liveness and readiness probes")
	}
	if sidecar.Resources.Requests["cpu"] == "" || sidecar.Resources.Requests["memory"] == "" || sidecar.Resources.Limits["memory"] == "" {
		t.Error("the sidecar needs cpu and memory requests and a memory limit")
	}
	if sc := sidecar.SecurityContext; sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || !sc.ReadOnlyRootFilesystem {
		t.Error("the sidecar must not escalate privileges and must have a read-only root file system")
	}
	checkKubernetesTrustBoundary(t, kinds, sidecar)
}

// docFiles are the files that show users commands and Caddyfiles.
func docFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{"README.md"}, files...)
}

// The Docker example must be reachable the way it is shown: the proxy
// binds the container's loopback, so the sidecar runs in the app's network
// namespace and nothing is published (issue 11).
func TestDockerExampleReachable(t *testing.T) {
	if regexp.MustCompile(`(?mi)^\s*EXPOSE\b`).MatchString(readFile(t, "Dockerfile")) {
		t.Error("the Dockerfile EXPOSEs a port, but nothing in the image is reachable from outside the app's network namespace")
	}
	dockerRun := regexp.MustCompile(`^\s*#?\s*docker run\b`)
	publish := regexp.MustCompile(`(^|\s)(-p|-P|--publish|--publish-all)(\s|=|$)`)
	runs := 0
	for _, f := range append(docFiles(t), "Dockerfile") {
		text := strings.ReplaceAll(readFile(t, f), "\\\n", " ") // shell line continuations
		for _, line := range strings.Split(text, "\n") {
			if !dockerRun.MatchString(line) || !strings.Contains(line, "caddy-fortnox") {
				continue
			}
			runs++
			if !strings.Contains(line, "--network container:") {
				t.Errorf("%s: %q does not run the sidecar in the app's network namespace (--network container:<app>): nothing could reach its loopback", f, strings.TrimSpace(line))
			}
			if publish.MatchString(line) {
				t.Errorf("%s: %q publishes a port: the token-injecting proxy must stay on loopback", f, strings.TrimSpace(line))
			}
		}
	}
	if runs < 3 { // the README, docs/deploy.md and the Dockerfile's header
		t.Errorf("found %d `docker run … caddy-fortnox` lines, want the README's, docs/deploy.md's and the Dockerfile's", runs)
	}
}

// Every Caddyfile the project ships or shows keeps the token-injecting
// port on loopback: each `bind` names loopback addresses only, a site with
// the fortnox handler has a bind, and (where the Caddyfile adapts) each
// server with the fortnox handler listens on loopback only.
func TestTokenPortOnLoopbackOnly(t *testing.T) {
	sources := map[string]string{
		"Caddyfile.example": readFile(t, "Caddyfile.example"),
		"demo/Caddyfile":    readFile(t, "demo/Caddyfile"),
	}
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	dec := yaml.NewDecoder(strings.NewReader(readFile(t, "deploy/kubernetes/sidecar.yaml")))
	for dec.Decode(&cm) == nil {
		if c := cm.Data["Caddyfile"]; c != "" {
			sources["deploy/kubernetes/sidecar.yaml"] = c
		}
	}
	block := regexp.MustCompile("(?s)```caddyfile\n(.*?)```")
	for _, f := range docFiles(t) {
		for i, m := range block.FindAllStringSubmatch(readFile(t, f), -1) {
			sources[f+" block "+strconv.Itoa(i+1)] = m[1]
		}
	}
	if len(sources) < 6 {
		t.Fatalf("only %d Caddyfiles found: the test would prove little", len(sources))
	}
	bind := regexp.MustCompile(`(?m)^\s*bind\s+(.+?)\s*(#.*)?$`)
	fortnoxSite := regexp.MustCompile(`(?m)^\s*fortnox\s*\{`)
	siteAddress := regexp.MustCompile(`(?m)^(https?://\S*|:\d+)\s*\{\s*$`)
	for name, text := range sources {
		for _, m := range bind.FindAllStringSubmatch(text, -1) {
			for _, addr := range strings.Fields(m[1]) {
				if !isLoopbackHost(addr) {
					t.Errorf("%s: `bind %s`: the token-injecting proxy must listen on loopback only", name, m[1])
				}
			}
		}
		if fortnoxSite.MatchString(text) && siteAddress.MatchString(text) && !bind.MatchString(text) {
			t.Errorf("%s: a site with the fortnox handler and no `bind 127.0.0.1`", name)
		}
		adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(text), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			continue // a fragment (`fortnox { ... }`)
		}
		var cfg adaptedConfig
		if err := json.Unmarshal(adapted, &cfg); err != nil {
			t.Fatal(err)
		}
		for srvName, srv := range cfg.Apps.HTTP.Servers {
			if !strings.Contains(string(srv.Routes), `"handler":"fortnox"`) {
				continue
			}
			for _, l := range srv.Listen {
				host, _, err := net.SplitHostPort(l)
				if err != nil || !isLoopbackHost(host) {
					t.Errorf("%s: server %s with the fortnox handler listens on %q", name, srvName, l)
				}
			}
		}
	}
}

func isLoopbackHost(host string) bool {
	host = strings.Trim(host, "[]")
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// FORTNOX_STORAGE_KEY is required by any Caddyfile that names it in
// encryption_key (as the Kubernetes example does): an empty placeholder is
// a config error. So no doc may call it optional.
func TestStorageKeyRequiredWhereNamed(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{})
	sc := &sidecar{t: t, fake: fake, dir: t.TempDir()}
	sc.caddyfileTemplate = caddyfileTemplate{port: freePort(t), adminPort: freePort(t), tokenURL: fake.TokenURL(), upstream: fake.URL(),
		options: "encryption_key {env.FORTNOX_TEST_UNSET_STORAGE_KEY}"}
	t.Setenv("FORTNOX_TEST_CLIENT_ID", testClientID)
	t.Setenv("FORTNOX_TEST_CLIENT_SECRET", testClientSecret)
	t.Setenv("FORTNOX_TEST_UNSET_STORAGE_KEY", "")
	if err := sc.load(); err == nil {
		_ = stopCaddy()
		t.Error("a Caddyfile naming an unset storage key loaded; want a config error")
	} else if !strings.Contains(err.Error(), "encryption_key is empty") {
		t.Errorf("a Caddyfile naming an unset storage key: %v, want encryption_key is empty", err)
	}
	if !strings.Contains(readFile(t, "deploy/kubernetes/sidecar.yaml"), "encryption_key {env.FORTNOX_STORAGE_KEY}") {
		t.Fatal("the Kubernetes Caddyfile no longer names FORTNOX_STORAGE_KEY: revisit this test")
	}
	for _, f := range docFiles(t) {
		for i, line := range strings.Split(readFile(t, f), "\n") {
			if strings.Contains(line, "FORTNOX_STORAGE_KEY") && strings.Contains(strings.ToLower(line), "optional") {
				t.Errorf("%s:%d calls FORTNOX_STORAGE_KEY optional, but the Kubernetes Caddyfile requires it: %s", f, i+1, line)
			}
		}
	}
}

// imageAdminSocket is where the image, its Caddyfile and the Kubernetes
// example put Caddy's admin endpoint.
const imageAdminSocket = "unix//run/caddy-fortnox/admin.sock"

// unsetEnv removes environment variables for the test (t.Setenv can only
// set them, and an empty value is not the same as none for {$VAR:default}).
func unsetEnv(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		if v, ok := os.LookupEnv(name); ok {
			os.Unsetenv(name)
			t.Cleanup(func() { os.Setenv(name, v) })
		}
	}
}

// adaptedAdmin adapts a Caddyfile and returns its admin listen address and
// the servers' listen addresses by the handlers they run.
func adaptedAdmin(t *testing.T, name, text string) (admin string, metricsListen []string, warnings []string) {
	t.Helper()
	adapted, ws, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(text), map[string]any{"filename": name})
	if err != nil {
		t.Fatalf("%s does not adapt: %v", name, err)
	}
	for _, w := range ws {
		warnings = append(warnings, w.String())
	}
	var cfg adaptedConfig
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	for _, srv := range cfg.Apps.HTTP.Servers {
		if strings.Contains(string(srv.Routes), `"handler":"metrics"`) {
			if strings.Contains(string(srv.Routes), `"handler":"fortnox"`) {
				t.Errorf("%s: the metrics handler shares a server with the fortnox handler", name)
			}
			metricsListen = append(metricsListen, srv.Listen...)
		}
	}
	return cfg.Admin.Listen, metricsListen, warnings
}

// In Kubernetes the app shares the pod's loopback and IP with the sidecar
// but none of its secrets: the admin socket's volume, the Secret and
// Redis's password go to the sidecar container alone; Redis asks for the
// password, keeps protected mode on, and admits only pods that run a
// sidecar; Prometheus scrapes a metrics site, not the admin endpoint.
func checkKubernetesTrustBoundary(t *testing.T, kinds map[string]k8sObject, sidecar *k8sContainer) {
	t.Helper()
	unsetEnv(t, "CADDY_ADMIN")
	caddyfile := kinds["ConfigMap/fortnox-sidecar"].Data["Caddyfile"]
	admin, metricsListen, warnings := adaptedAdmin(t, "sidecar.yaml's Caddyfile", caddyfile)
	if admin != imageAdminSocket {
		t.Errorf("the ConfigMap's Caddyfile puts the admin endpoint on %q, want %s", admin, imageAdminSocket)
	}
	for _, w := range warnings {
		t.Errorf("the ConfigMap's Caddyfile adapts with a warning: %s", w)
	}

	pod := kinds["Deployment/my-fortnox-app"].Spec.Template
	// The admin socket's directory: an emptyDir mounted into the sidecar
	// container alone.
	socketDir := strings.TrimSuffix(strings.TrimPrefix(imageAdminSocket, "unix/"), "/admin.sock")
	var adminVolume string
	for _, m := range sidecar.VolumeMounts {
		if m.MountPath == socketDir {
			adminVolume = m.Name
		}
	}
	if adminVolume == "" {
		t.Fatalf("the sidecar mounts no volume at %s, the admin socket's directory (its root file system is read-only)", socketDir)
	}
	for _, v := range pod.Spec.Volumes {
		if v.Name == adminVolume && v.EmptyDir == nil {
			t.Errorf("volume %s (the admin socket) is not an emptyDir: it must be the pod's own", adminVolume)
		}
	}
	everyContainer := append(append([]k8sContainer{}, pod.Spec.InitContainers...), pod.Spec.Containers...)
	if len(everyContainer) < 2 {
		t.Fatal("the pod has no app container beside the sidecar")
	}
	for _, c := range everyContainer {
		if c.Name == sidecar.Name {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m.Name == adminVolume || m.MountPath == socketDir || m.Name == "tokens" {
				t.Errorf("container %s mounts %s at %s: only the sidecar may", c.Name, m.Name, m.MountPath)
			}
		}
		if len(c.EnvFrom) > 0 {
			t.Errorf("container %s takes envFrom: it could hold the sidecar's secrets", c.Name)
		}
		for _, e := range c.Env {
			if len(e.ValueFrom.SecretKeyRef) > 0 {
				t.Errorf("container %s gets %s from a Secret: only the sidecar gets secrets", c.Name, e.Name)
			}
			if strings.Contains(e.Value, "2019") || strings.Contains(strings.ToUpper(e.Name), "ADMIN") {
				t.Errorf("container %s is told of an admin endpoint (%s=%s)", c.Name, e.Name, e.Value)
			}
		}
	}
	redisPassword := ""
	for _, e := range sidecar.Env {
		if e.Name == "FORTNOX_REDIS_PASSWORD" {
			redisPassword = e.ValueFrom.SecretKeyRef["key"]
		}
	}
	if redisPassword == "" || kinds["Secret/fortnox-credentials"].StringData[redisPassword] == "" {
		t.Errorf("the sidecar's FORTNOX_REDIS_PASSWORD does not come from a key of the Secret (%q)", redisPassword)
	}

	// Redis: the same password, from the Secret, as requirepass.
	redisPod := kinds["StatefulSet/fortnox-redis"].Spec.Template
	if len(redisPod.Spec.Containers) != 1 {
		t.Fatalf("Redis runs %d containers, want 1", len(redisPod.Spec.Containers))
	}
	redis := redisPod.Spec.Containers[0]
	passwordVar := ""
	for _, e := range redis.Env {
		if e.ValueFrom.SecretKeyRef["name"] == "fortnox-credentials" && e.ValueFrom.SecretKeyRef["key"] == redisPassword && e.Name != "REDISCLI_AUTH" {
			passwordVar = e.Name
		}
	}
	if passwordVar == "" || !strings.Contains(strings.Join(redis.Args, " "), "--requirepass $("+passwordVar+")") {
		t.Errorf("Redis does not take requirepass from the Secret's %s: args %q", redisPassword, redis.Args)
	}

	// The NetworkPolicy: selects the Redis pods, admits on 6379 only pods
	// labelled as the Deployment's pods are.
	np := kinds["NetworkPolicy/fortnox-redis"].Spec
	if !reflect.DeepEqual(np.PodSelector.MatchLabels, map[string]string{"app": "fortnox-redis"}) || redisPod.Metadata.Labels["app"] != "fortnox-redis" {
		t.Errorf("the NetworkPolicy selects %v, the Redis pods are labelled %v", np.PodSelector.MatchLabels, redisPod.Metadata.Labels)
	}
	if !slices.Contains(np.PolicyTypes, "Ingress") || len(np.Ingress) != 1 || len(np.Ingress[0].From) != 1 {
		t.Fatalf("the NetworkPolicy must have one Ingress rule from one peer: %+v", np)
	}
	peer := np.Ingress[0].From[0]
	if peer.PodSelector == nil || len(peer.PodSelector.MatchLabels) == 0 || peer.NamespaceSelector != nil || peer.IPBlock != nil {
		t.Fatalf("the NetworkPolicy admits %+v, want pods by label only", peer)
	}
	for k, v := range peer.PodSelector.MatchLabels {
		if pod.Metadata.Labels[k] != v {
			t.Errorf("the NetworkPolicy admits pods labelled %s=%s, which the sidecar's pods are not (%v)", k, v, pod.Metadata.Labels)
		}
	}
	if len(np.Ingress[0].Ports) != 1 || np.Ingress[0].Ports[0].Port != 6379 {
		t.Errorf("the NetworkPolicy opens %+v, want 6379 only", np.Ingress[0].Ports)
	}

	// Metrics: a site of its own, the port the annotations name, declared
	// on the sidecar container.
	port := pod.Metadata.Annotations["prometheus.io/port"]
	if pod.Metadata.Annotations["prometheus.io/scrape"] != "true" || port == "" {
		t.Fatalf("the pod is not annotated for Prometheus: %v", pod.Metadata.Annotations)
	}
	if !slices.Contains(metricsListen, ":"+port) {
		t.Errorf("Prometheus scrapes port %s, the metrics handler listens on %v", port, metricsListen)
	}
	declared := false
	for _, p := range sidecar.Ports {
		declared = declared || strconv.Itoa(p.ContainerPort) == port
	}
	if !declared {
		t.Errorf("the sidecar does not declare port %s (metrics)", port)
	}

	// kubectl, where it is installed, reads every object (offline: it is
	// given a cluster that does not exist, so it never asks one).
	if kubectl, err := exec.LookPath("kubectl"); err == nil {
		kubeconfig := filepath.Join(t.TempDir(), "config")
		if err := os.WriteFile(kubeconfig, []byte("apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster: {server: \"https://127.0.0.1:1\"}\ncontexts:\n- name: none\n  context: {cluster: none, user: none}\ncurrent-context: none\nusers:\n- name: none\n  user: {}\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(kubectl, "label", "--local", "-f", "deploy/kubernetes/sidecar.yaml", "checked=yes", "-o", "name")
		cmd.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl cannot read deploy/kubernetes/sidecar.yaml: %v\n%s", err, out)
		}
		if got := len(strings.Fields(string(out))); got != len(kinds) {
			t.Errorf("kubectl read %d objects, the YAML has %d:\n%s", got, len(kinds), out)
		}
	}
}

// tcpAdmin matches a TCP admin address or URL: Caddy's default port, or an
// `admin` option (or CADDY_ADMIN) naming anything but a unix socket or off.
var tcpAdmin = []*regexp.Regexp{
	regexp.MustCompile(`\b2019\b`),
	regexp.MustCompile(`(?m)^\s*admin\s+(\{\$[A-Z_]+:)?"?(localhost|tcp|https?:|\d|\[|:)`),
	regexp.MustCompile(`(CADDY_ADMIN|--address)[= ]["']?(localhost|tcp|https?:|\d|\[|:)`),
}

// No file we ship shows a TCP admin address or URL (issue 16): every
// Caddyfile puts the admin endpoint on a unix socket, and no doc, script
// or manifest names the TCP one, not even to describe the attack.
func TestShippedFilesKeepTheAdminOffTCP(t *testing.T) {
	files := append(docFiles(t), "Caddyfile.example", "demo/Caddyfile", "run.sh", "Dockerfile", "deploy/kubernetes/sidecar.yaml", "xcaddy.sh", ".dockerignore")
	more, err := filepath.Glob("deploy/*/*")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range more {
		if !slices.Contains(files, f) {
			files = append(files, f)
		}
	}
	for _, f := range files {
		for i, line := range strings.Split(readFile(t, f), "\n") {
			for _, re := range tcpAdmin {
				if re.MatchString(line) {
					t.Errorf("%s:%d shows a TCP admin address: %s", f, i+1, strings.TrimSpace(line))
				}
			}
		}
	}

	// Each shipped Caddyfile, and each doc's Caddyfile with global options,
	// adapts to an admin endpoint on a unix socket, with no warning.
	unsetEnv(t, "CADDY_ADMIN", "FORTNOX_DEMO_PORT", "FORTNOX_FAKE_PORT", "FORTNOX_CONNECT_PORT")
	want := map[string]string{"Caddyfile.example": imageAdminSocket, "demo/Caddyfile": "unix/.demo/admin/admin.sock"}
	for f, socket := range want {
		admin, metrics, warnings := adaptedAdmin(t, f, readFile(t, f))
		if admin != socket {
			t.Errorf("%s: the admin endpoint is %q, want %s", f, admin, socket)
		}
		for _, w := range warnings {
			t.Errorf("%s adapts with a warning: %s", f, w)
		}
		if f == "Caddyfile.example" && !slices.Contains(metrics, ":9180") {
			t.Errorf("%s serves metrics on %v, want a site of its own on :9180", f, metrics)
		}
	}
	block := regexp.MustCompile("(?s)```caddyfile\n(.*?)```")
	for _, f := range docFiles(t) {
		for i, m := range block.FindAllStringSubmatch(readFile(t, f), -1) {
			if !strings.HasPrefix(strings.TrimSpace(m[1]), "{") || !strings.Contains(m[1], "fortnox") {
				continue // a fragment, or no global options
			}
			name := fmt.Sprintf("%s block %d", f, i+1)
			adapted, ws, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(m[1]), map[string]any{"filename": "Caddyfile"})
			if err != nil {
				continue // a sketch with … in it
			}
			var cfg struct {
				Admin struct {
					Listen string `json:"listen"`
				} `json:"admin"`
			}
			_ = json.Unmarshal(adapted, &cfg)
			if !strings.HasPrefix(cfg.Admin.Listen, "unix/") {
				t.Errorf("%s: the admin endpoint is %q, want a unix socket", name, cfg.Admin.Listen)
			}
			for _, w := range ws {
				if strings.Contains(w.Message, "admin endpoint") {
					t.Errorf("%s: %s", name, w)
				}
			}
		}
	}

	// run.sh: the socket in a 0700 directory, CADDY_ADMIN set to it (both
	// Caddyfiles read it), and a banner with no TCP admin URL (the first
	// check above).
	sh := readFile(t, "run.sh")
	for _, want := range []string{`admin_dir=.demo/admin`, `admin_socket="$admin_dir/admin.sock"`, `chmod 0700 "$admin_dir"`, `export CADDY_ADMIN="unix/$admin_socket"`,
		`FORTNOX_DEMO_PORT="${FORTNOX_DEMO_PORT:-8080}"`, `FORTNOX_FAKE_PORT="${FORTNOX_FAKE_PORT:-8099}"`, "export CADDY_ADMIN=@ADMIN@"} {
		if !strings.Contains(sh, want) {
			t.Errorf("run.sh lacks %q", want)
		}
	}
	for _, f := range []string{"Caddyfile.example", "demo/Caddyfile"} {
		if !strings.Contains(readFile(t, f), "admin {$CADDY_ADMIN:") {
			t.Errorf("%s does not read CADDY_ADMIN: run.sh's socket would not be the one Caddy opens", f)
		}
	}
}

// adaptedConfig is the part of an adapted Caddyfile's JSON the shipped-file
// tests read: the admin endpoint and each server's listeners and routes.
type adaptedConfig struct {
	Admin struct {
		Listen string `json:"listen"`
	} `json:"admin"`
	Apps struct {
		HTTP struct {
			Servers map[string]struct {
				Listen []string        `json:"listen"`
				Routes json.RawMessage `json:"routes"`
			} `json:"servers"`
		} `json:"http"`
	} `json:"apps"`
}
