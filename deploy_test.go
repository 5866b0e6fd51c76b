package fortnox

import (
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"gopkg.in/yaml.v3"
)

// Docker cannot run in CI; this keeps the Dockerfile's build the command
// CI runs, and the Kubernetes example a valid one.
func TestDockerfileBuildsWithXcaddySh(t *testing.T) {
	b, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	df := string(b)
	for _, want := range []string{"RUN OUTPUT=/out/caddy ./xcaddy.sh", "USER nonroot", "/etc/caddy/Caddyfile", "VOLUME /data", "FROM golang:1.26"} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	gomod, _ := os.ReadFile("go.mod")
	if !strings.Contains(string(gomod), "\ngo 1.26") {
		t.Error("go.mod's Go version no longer matches the Dockerfile's golang:1.26")
	}
}

func TestKubernetesExample(t *testing.T) {
	f, err := os.Open("deploy/kubernetes/sidecar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	kinds := map[string]map[string]any{}
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); err != nil {
			if err.Error() == "EOF" {
				break
			}
			t.Fatalf("YAML: %v", err)
		}
		kinds[doc["kind"].(string)] = doc
	}
	for _, k := range []string{"Secret", "ConfigMap", "PersistentVolumeClaim", "Deployment"} {
		if kinds[k] == nil {
			t.Errorf("no %s", k)
		}
	}
	caddyfile := kinds["ConfigMap"]["data"].(map[string]any)["Caddyfile"].(string)
	if !strings.Contains(caddyfile, "bind 127.0.0.1") {
		t.Error("the sidecar's proxy port must be bound to loopback")
	}
	if _, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"}); err != nil {
		t.Errorf("the ConfigMap's Caddyfile does not adapt: %v", err)
	}
}
