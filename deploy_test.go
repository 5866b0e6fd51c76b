package fortnox

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

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
		"RUN OUTPUT=/out/caddy ./xcaddy.sh", // the build: what .ci/run runs
		"FROM golang:1.26",                  // the Go of go.mod (below)
		"USER nonroot",                      // not root
		"VOLUME /data",                      // Caddy's storage
		"ENV XDG_DATA_HOME=/data",           // ... is where Caddy puts it
		`"--config", "/etc/caddy/Caddyfile"`,
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	if !regexp.MustCompile(`(?m)^\./xcaddy\.sh$`).MatchString(readFile(t, ".ci/run")) {
		t.Error(".ci/run no longer runs ./xcaddy.sh: CI would not prove the Dockerfile's build")
	}
	if !strings.Contains(readFile(t, "go.mod"), "\ngo 1.26") {
		t.Error("go.mod's Go version no longer matches the Dockerfile's golang:1.26")
	}
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
	Kind string            `yaml:"kind"`
	Data map[string]string `yaml:"data"`
	Spec struct {
		AccessModes []string `yaml:"accessModes"`
		Template    struct {
			Spec k8sPodSpec `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
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
	} `yaml:"volumes"`
}

type k8sContainer struct {
	Name          string `yaml:"name"`
	RestartPolicy string `yaml:"restartPolicy"`
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
		kinds[obj.Kind] = obj
	}
	for _, k := range []string{"Secret", "ConfigMap", "PersistentVolumeClaim", "Deployment"} {
		if _, ok := kinds[k]; !ok {
			t.Errorf("no %s", k)
		}
	}

	// The Caddyfile: adapts, keeps the proxy on loopback, takes its
	// secrets from the environment, and stores tokens on the volume.
	caddyfile := kinds["ConfigMap"].Data["Caddyfile"]
	if _, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"}); err != nil {
		t.Errorf("the ConfigMap's Caddyfile does not adapt: %v", err)
	}
	for _, want := range []string{"bind 127.0.0.1", "{env.FORTNOX_CLIENT_ID}", "{env.FORTNOX_CLIENT_SECRET}", "{env.FORTNOX_STORAGE_KEY}", "storage file_system /data/"} {
		if !strings.Contains(caddyfile, want) {
			t.Errorf("the ConfigMap's Caddyfile lacks %q", want)
		}
	}
	if modes := kinds["PersistentVolumeClaim"].Spec.AccessModes; len(modes) != 1 || modes[0] != "ReadWriteMany" {
		t.Errorf("the token volume's access modes are %v: replicas need ReadWriteMany", modes)
	}

	pod := kinds["Deployment"].Spec.Template.Spec
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
	for _, name := range []string{"FORTNOX_CLIENT_ID", "FORTNOX_CLIENT_SECRET", "FORTNOX_STORAGE_KEY"} {
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
}
