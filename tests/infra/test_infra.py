"""Checks of the deployment artifacts: Dockerfile, Kubernetes, Compose, Terraform,
the GitHub App manifest and the operations docs.

Tools: hadolint, kubernetes-validate, checkov and a PromQL parser come from the
infra virtualenv (.ci/infra-tools.sh). Kustomize rendering uses `kubectl kustomize`
(or `kustomize build`); without either, each base and overlay file is checked on
its own instead (patches are then only checked to target a real object).
`terraform fmt -check` is used when terraform is on PATH; otherwise the files are
parsed with the HCL parser checkov ships and put through the format check below,
which enforces what terraform fmt does to the layout (indentation, aligned `=`,
whitespace), though not its spacing inside expressions.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "kubernetes"
COMPOSE = INFRA / "compose"
TERRAFORM = INFRA / "terraform"
OVERLAYS = {
    "base": K8S / "base",
    "production": K8S / "overlays" / "production",
    "monitoring": K8S / "overlays" / "monitoring",
}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # no schema ships for these
K8S_VERSIONS = ["1.28.0", "1.37.0"]  # oldest and newest the manifests are meant for

# The metric names the dashboard and alerts may use.
METRICS = {
    "orchestrator_webhook_deliveries_total",
    "orchestrator_jobs",
    "orchestrator_webhook_to_launch_seconds",
    "orchestrator_runners",
    "orchestrator_reaper_actions_total",
    "orchestrator_budget_spent_usd",
    "orchestrator_budget_reserved_usd",
    "orchestrator_budget_limit_usd",
    "orchestrator_leaked_vms_total",
    "orchestrator_github_calls_total",
    "orchestrator_github_rate_limit_remaining",
    "orchestrator_launches_total",
}

ENV = {
    "GITHUB_WEBHOOK_SECRET": "whsec",
    "ORCHESTRATOR_ADMIN_TOKEN": "admintoken",
    "DATABASE_URL": "postgresql+psycopg://orchestrator:pw@postgres:5432/orchestrator",
    "GITHUB_TOKEN": "ghp_example",
    "ORCHESTRATOR_PUBLIC_URL": "https://runners.example.com",
}


def run(cmd: list[str], *, cwd: Path | None = None, timeout: int = 180,
        env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


# ruamel.yaml is an application dependency, so no extra YAML package is needed.
_YAML = YAML(typ="safe", pure=True)


def parse_yaml(text: str):
    return _YAML.load(text)


def parse_yaml_all(text: str) -> list:
    return [x for x in _YAML.load_all(text) if x]


def dump_yaml_all(docs: list) -> str:
    out = io.StringIO()
    _YAML.dump_all(docs, out)
    return out.getvalue()


def load_yaml(path: Path):
    return parse_yaml(path.read_text())


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# --- Dockerfile ----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_dockerfile(infra_tool):
    p = run([infra_tool("hadolint"), "--failure-threshold", "style", "Dockerfile"], cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_contract():
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert froms[-1].split()[0] == "python:3.11-slim"
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    user = [rest for word, rest in final if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "final stage must run as non-root"
    health = " ".join(rest for word, rest in final if word == "HEALTHCHECK")
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "urllib" in health and "curl" not in health
    assert "/healthz" in health or ("ORCHESTRATOR_HEALTH_URL" in health and "/healthz" in env)
    assert ("ENTRYPOINT", '["orchestrator"]') in final
    assert ("CMD", '["serve"]') in final
    assert "ORCHESTRATOR_CONFIG=" in env
    assert any(w == "COPY" and "--from=builder" in rest for w, rest in final)


def test_dockerignore_keeps_build_inputs():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list style: ignore everything, then re-include"
    kept = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            for src in rest.split()[:-1]:
                assert src.rstrip("/") in kept, f"COPY {src} is excluded by .dockerignore"
                assert (REPO / src).exists(), f"COPY {src}: no such path"


# --- Kubernetes ----------------------------------------------------------------


@dataclass
class Rendered:
    docs: list[dict]
    path: Path
    by_kustomize: bool


def _files_of(d: Path) -> list[dict]:
    """Fallback without kustomize: resources, generated ConfigMaps and image
    replacements, but no patches."""
    k = load_yaml(d / "kustomization.yaml")
    docs: list[dict] = []
    for r in k.get("resources", []):
        p = (d / r).resolve()
        docs += _files_of(p) if p.is_dir() else parse_yaml_all(p.read_text())
    for gen in k.get("configMapGenerator", []):
        meta = {"name": gen["name"]}
        if gen.get("behavior") == "replace":
            (old,) = [x for x in docs if x["kind"] == "ConfigMap" and x["metadata"]["name"] == gen["name"]]
            meta = old["metadata"]
            docs.remove(old)
        data = {Path(f).name: (d / f).read_text() for f in gen.get("files", [])}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for img in k.get("images", []):
        for x in by_kind(docs, "Deployment"):
            for c in x["spec"]["template"]["spec"]["containers"]:
                name, _, tag = c["image"].rpartition(":") if ":" in c["image"] else (c["image"], "", "")
                if name == img["name"]:
                    tag = img.get("newTag", tag)
                    c["image"] = img.get("newName", name) + (f":{tag}" if tag else "")
                    if "digest" in img:
                        c["image"] = f"{img.get('newName', name)}@{img['digest']}"
    if k.get("namespace"):
        for x in docs:
            if x["kind"] != "Namespace":
                x["metadata"]["namespace"] = k["namespace"]
    return docs


@pytest.fixture(scope="session")
def rendered(kustomize_cmd, tmp_path_factory) -> dict[str, Rendered]:
    out = tmp_path_factory.mktemp("k8s-rendered")
    result = {}
    for name, d in OVERLAYS.items():
        if kustomize_cmd:
            p = run([*kustomize_cmd, str(d)])
            assert p.returncode == 0, f"kustomize {name}: {p.stderr}"
            text = p.stdout
        else:
            text = dump_yaml_all(_files_of(d))
        path = out / f"{name}.yaml"
        path.write_text(text)
        docs = parse_yaml_all(text)
        result[name] = Rendered(docs, path, kustomize_cmd is not None)
    return result


def test_kustomize_available_or_reported(kustomize_cmd):
    if kustomize_cmd is None:
        pytest.skip("no kubectl/kustomize: overlays are checked file by file, without patches")


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_kubernetes_validate(overlay, rendered, infra_tool):
    tool = infra_tool("kubernetes-validate")
    for version in K8S_VERSIONS:
        p = run([tool, "--strict", "--quiet", "-k", version, str(rendered[overlay].path)])
        assert p.returncode == 0, p.stdout + p.stderr
        unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", p.stdout + p.stderr))
        assert unknown <= CRD_KINDS, f"not validated: {unknown - CRD_KINDS}"


def test_overlay_patches_target_existing_objects():
    base = _files_of(OVERLAYS["base"])
    names = {(x["kind"], x["metadata"]["name"]) for x in base}
    for d in OVERLAYS.values():
        k = load_yaml(d / "kustomization.yaml")
        for patch in k.get("patches", []):
            if "path" in patch:
                target = load_yaml(d / patch["path"])
                key = (target["kind"], target["metadata"]["name"])
            else:
                key = (patch["target"]["kind"], patch["target"]["name"])
                assert isinstance(parse_yaml(patch["patch"]), list)
            assert key in names, f"{d.name}: patch targets {key}, which the base lacks"


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_deployment_contract(overlay, rendered):
    docs = rendered[overlay].docs
    dep = one(docs, "Deployment")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["automountServiceAccountToken"] is False
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 10000
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    env = {e["name"]: e for e in c["env"]}
    assert env["ORCHESTRATOR_CONFIG"]["value"] == "/etc/orchestrator/config.yaml"
    for var in ("GITHUB_WEBHOOK_SECRET", "ORCHESTRATOR_ADMIN_TOKEN", "DATABASE_URL"):
        assert "secretKeyRef" in env[var]["valueFrom"], f"{var} must come from a Secret"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "secret" in volumes[mounts["/etc/orchestrator/github"]]
    cm_name = volumes[mounts["/etc/orchestrator/config.yaml"]]["configMap"]["name"]
    assert cm_name in {x["metadata"]["name"] for x in by_kind(docs, "ConfigMap")}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    svc = one(docs, "Service")
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_ingress_exposes_only_github_and_vm_paths(overlay, rendered):
    ing = one(rendered[overlay].docs, "Ingress")
    paths = {(p["path"], p["pathType"]) for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths == {("/webhook", "Exact"), ("/api/v1/bootstrap", "Exact"), ("/api/v1/instances", "Prefix")}
    assert ing["spec"]["tls"], "the webhook secret and JIT configs must travel over TLS"


def test_servicemonitor_matches_service(rendered):
    docs = rendered["monitoring"].docs
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["port"] in ports and e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    assert not by_kind(rendered["production"].docs, "ServiceMonitor"), "CRDs only in the monitoring overlay"


def _load_orchestrator_config(path: Path):
    config = pytest.importorskip("orchestrator.config")
    return config.load_config_text(path.read_text(), str(path), dict(ENV))


@pytest.mark.parametrize("path", [
    K8S / "base" / "config.yaml",
    K8S / "overlays" / "production" / "config.yaml",
    COMPOSE / "orchestrator.yaml",
], ids=["k8s-base", "k8s-production", "compose"])
def test_shipped_configs_are_valid(path):
    cfg = _load_orchestrator_config(path)
    assert cfg.server.orchestrator_id, "set orchestrator_id: the cloud roles are scoped to it"
    assert cfg.database.url.startswith("postgresql+psycopg://"), "several replicas need PostgreSQL"


@pytest.fixture(scope="session")
def checkov_k8s(rendered, infra_tool, tmp_path_factory) -> dict:
    checkov = infra_tool("checkov")
    d = tmp_path_factory.mktemp("checkov-k8s")
    for name, r in rendered.items():
        shutil.copy(r.path, d / f"{name}.yaml")
    shutil.copy(REPO / "Dockerfile", d / "Dockerfile")
    return _checkov(checkov, d, ["kubernetes", "dockerfile"])


def _checkov(checkov: str, target: Path, frameworks: list[str]) -> dict:
    env = {**os.environ, "LOG_LEVEL": "ERROR"}
    p = run([checkov, "-d", str(target), "--framework", *frameworks, "-o", "json", "--skip-download"],
            cwd=target, env=env, timeout=300)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    data = json.loads(p.stdout)
    reports = data if isinstance(data, list) else [data]
    merged = {"passed": [], "failed": [], "skipped": [], "types": set()}
    for rep in reports:
        if "results" not in rep:
            continue
        merged["types"].add(rep.get("check_type"))
        merged["passed"] += rep["results"]["passed_checks"]
        merged["failed"] += rep["results"]["failed_checks"]
        merged["skipped"] += rep["results"]["skipped_checks"]
    return merged


def _assert_checkov_clean(res: dict) -> None:
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}" for c in res["failed"]]
    assert not failed, "checkov failures:\n" + "\n".join(failed)
    assert res["passed"], "checkov scanned nothing"
    for c in res["skipped"]:
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        assert reason.strip() and reason != "No comment provided", f"{c['check_id']} skipped without a reason"


def test_checkov_kubernetes_and_dockerfile(checkov_k8s):
    _assert_checkov_clean(checkov_k8s)
    assert {"kubernetes", "dockerfile"} <= checkov_k8s["types"]


# --- Compose, Prometheus, Grafana ------------------------------------------------


@pytest.fixture(scope="session")
def compose() -> dict:
    return load_yaml(COMPOSE / "docker-compose.yml")


def test_compose_structure(compose):
    services = compose["services"]
    orch = [n for n, s in services.items() if s.get("image", "").startswith("orchestrator") or "build" in s]
    assert len(orch) == 2, "two orchestrator replicas"
    for n in orch:
        s = services[n]
        assert s["build"]["dockerfile"] == "Dockerfile"
        assert (COMPOSE / s["build"]["context"] / "Dockerfile").is_file()
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"]
        assert s["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://")
        mounts = {v.split(":")[1]: v.split(":")[0] for v in s["volumes"]}
        assert (COMPOSE / mounts[s["environment"]["ORCHESTRATOR_CONFIG"]]).is_file()
    assert "healthcheck" in services["postgres"]
    for n in ("prometheus", "grafana"):
        for v in services[n]["volumes"]:
            src = v.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE / src).exists(), f"{n}: {src} missing"
    env_example = (COMPOSE / ".env.example").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", (COMPOSE / "docker-compose.yml").read_text()))
    assert required <= set(re.findall(r"^(\w+)=", env_example, re.M)), "every required variable in .env.example"


def test_docker_compose_config_if_available(tmp_path):
    if not shutil.which("docker") or run(["docker", "compose", "version"], timeout=30).returncode != 0:
        pytest.skip("docker compose plugin not installed; structure is checked by test_compose_structure")
    env = {**os.environ, **ENV, "POSTGRES_PASSWORD": "pw", "GRAFANA_ADMIN_PASSWORD": "pw"}
    p = run(["docker", "compose", "-f", str(COMPOSE / "docker-compose.yml"), "config", "-q"], env=env, cwd=COMPOSE)
    assert p.returncode == 0, p.stderr


def test_prometheus_scrapes_every_replica(compose):
    prom = load_yaml(COMPOSE / "prometheus" / "prometheus.yml")
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "orchestrator"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    orch = {n for n, s in compose["services"].items() if "build" in s}
    assert targets == {f"{n}:8080" for n in orch}
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_alert_rules_same_in_compose_and_kubernetes():
    k8s = load_yaml(K8S / "overlays" / "monitoring" / "prometheusrule.yaml")["spec"]
    assert load_yaml(COMPOSE / "prometheus" / "alerts.yml") == k8s


def test_grafana_provisioning():
    ds = load_yaml(COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (src,) = ds["datasources"]
    assert src["type"] == "prometheus" and src["url"] == "http://prometheus:9090"
    dash = json.loads((COMPOSE / "grafana" / "dashboards" / "orchestrator.json").read_text())
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == src["uid"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == src["uid"]
    prov = load_yaml(COMPOSE / "grafana" / "provisioning" / "dashboards" / "orchestrator.yml")
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def _dashboard_exprs() -> dict[str, list[str]]:
    dash = json.loads((COMPOSE / "grafana" / "dashboards" / "orchestrator.json").read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dash["panels"]}


def _alert_exprs() -> list[str]:
    rules = load_yaml(COMPOSE / "prometheus" / "alerts.yml")
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(orchestrator_[a-z0-9_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_dashboard_panels_cover_operations():
    exprs = _dashboard_exprs()
    wanted = {
        "Spend vs caps": {"orchestrator_budget_spent_usd", "orchestrator_budget_reserved_usd",
                          "orchestrator_budget_limit_usd"},
        "Runners by state": {"orchestrator_runners"},
        "Webhook to launch latency": {"orchestrator_webhook_to_launch_seconds"},
        "Reaper actions": {"orchestrator_reaper_actions_total"},
        "GitHub rate limit remaining": {"orchestrator_github_rate_limit_remaining"},
    }
    for title, metrics in wanted.items():
        used = set().union(*(_metric_names(e) for e in exprs[title]))
        assert metrics <= used, f"{title}: missing {metrics - used}"
    used = set().union(*(_metric_names(e) for es in exprs.values() for e in es), *map(_metric_names, _alert_exprs()))
    assert used <= METRICS, f"unknown metrics: {used - METRICS}"


def test_promql_parses(infra_tool):
    python = infra_tool("python")
    exprs = [e for es in _dashboard_exprs().values() for e in es] + _alert_exprs()
    # Grafana fills $__rate_interval in before Prometheus sees the query.
    exprs = [e.replace("$__rate_interval", "5m") for e in exprs]
    script = (
        "import json, sys\n"
        "try:\n    import promql_parser\nexcept ImportError:\n    sys.exit(3)\n"
        "bad = []\n"
        "for e in json.load(sys.stdin):\n"
        "    try:\n        promql_parser.parse(e)\n"
        "    except Exception as exc:\n        bad.append(f'{e!r}: {exc}')\n"
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    p = run([python, "-c", script], stdin=json.dumps(exprs))
    if p.returncode == 3:
        msg = "promql-parser missing from the infra venv; run: bash .ci/infra-tools.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dashboard_metrics_exist_in_code():
    """The dashboard must chart what the code exports (once the code exports anything)."""
    sources = "\n".join(p.read_text() for p in (REPO / "orchestrator").rglob("*.py"))
    defined = set(re.findall(r"[\"'](orchestrator_[a-z0-9_]+)[\"']", sources))
    if not defined:
        pytest.skip("no metrics defined in orchestrator/ yet")
    # prometheus_client adds _total to counters itself, so either spelling counts.
    defined |= {n + "_total" for n in defined} | {n.removesuffix("_total") for n in defined}
    used = set().union(*(_metric_names(e) for es in _dashboard_exprs().values() for e in es),
                       *map(_metric_names, _alert_exprs()))
    assert used <= defined, f"dashboard/alerts use metrics the code does not define: {sorted(used - defined)}"


# --- Terraform -----------------------------------------------------------------


def tf_files() -> list[Path]:
    return sorted(TERRAFORM.rglob("*.tf"))


def _strip_strings_and_comments(line: str) -> str:
    out, i, quote = [], 0, False
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quote = False
        elif ch == '"':
            quote = True
        elif ch == "#" or line.startswith("//", i):
            break
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def hcl_format_problems(text: str, name: str = "<hcl>") -> list[str]:
    """Layout rules of terraform fmt: 2-space nesting, `=` of consecutive one-line
    attributes aligned one space after the longest name, no tabs or trailing blanks."""
    problems = []
    if "\t" in text:
        problems.append(f"{name}: tab character")
    if not text.endswith("\n") or text.endswith("\n\n"):
        problems.append(f"{name}: must end with exactly one newline")
    # terraform fmt indents one level per line that leaves brackets open, however
    # many it opens: each stack entry is one such line and its unclosed count.
    stack: list[int] = []
    group: list[tuple[int, int, int]] = []
    heredoc = None

    def close_group():
        if group:
            want = max(key_end for _, _, key_end in group) + 1
            problems.extend(f"{name}:{ln}: `=` belongs in column {want + 1}, one space after the longest name"
                            for ln, col, _ in group if col != want)
        group.clear()

    def close_one(st: list[int]) -> None:
        if st:
            st[-1] -= 1
            if st[-1] == 0:
                st.pop()

    for ln, line in enumerate(text.splitlines(), 1):
        if heredoc:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if line != line.rstrip():
            problems.append(f"{name}:{ln}: trailing whitespace")
        stripped = line.strip()
        code = _strip_strings_and_comments(line)
        brackets = [c for c in code if c in "{[()]}"]
        if stripped:
            lead = len(re.match(r"[}\])]*", _strip_strings_and_comments(stripped)).group(0))
            view = list(stack)
            for _ in range(lead):
                close_one(view)
            want = 2 * len(view)
            have = len(line) - len(line.lstrip(" "))
            if have != want:
                problems.append(f"{name}:{ln}: indented {have}, terraform fmt uses {want}")
        opened = 0
        for c in brackets:
            if c in "{[(":
                opened += 1
            elif opened:
                opened -= 1
            else:
                close_one(stack)
        if opened:
            stack.append(opened)
        attr = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_-]*)(\s*)=(?!=)", line)
        if attr and not opened and not (brackets and brackets[0] in "}])"):
            group.append((ln, attr.end() - 1, len(attr.group(1)) + len(attr.group(2))))
        else:
            close_group()
            # A value spanning lines is aligned with nothing: one space before `=`.
            if attr and attr.group(3) != " ":
                problems.append(f"{name}:{ln}: one space before `=` of a multi-line value")
        m = re.search(r"<<-?([A-Z_]+)\s*$", code)
        if m:
            heredoc = m.group(1)
    close_group()
    if stack:
        problems.append(f"{name}: unbalanced brackets")
    return problems


def test_hcl_format_checker_catches_layout_errors():
    good = 'resource "a" "b" {\n  name  = "x"\n  count = 1\n\n  tags = {\n    k = "v"\n  }\n}\n'
    assert hcl_format_problems(good) == []
    assert hcl_format_problems(good.replace("name  =", "name =")), "misaligned ="
    assert hcl_format_problems(good.replace("name  =", "name   =").replace("count =", "count  =")), "too wide"
    assert hcl_format_problems(good.replace('    k = "v"', '   k = "v"')), "bad indent"
    assert hcl_format_problems(good + "\n"), "extra blank line"


def test_terraform_fmt():
    if shutil.which("terraform"):
        p = run(["terraform", "fmt", "-check", "-diff", "-recursive", str(TERRAFORM)],
                env={**os.environ, "TF_IN_AUTOMATION": "1"})
        assert p.returncode == 0, p.stdout + p.stderr
    problems = [pr for f in tf_files() for pr in hcl_format_problems(f.read_text(), str(f.relative_to(REPO)))]
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def tf_parsed(infra_tool) -> dict[str, dict]:
    """Every .tf file parsed with the HCL2 parser that checkov uses."""
    script = (
        "import json, sys, hcl2\n"
        "out = {}\n"
        "for f in sys.argv[1:]:\n"
        "    with open(f) as fh:\n        out[f] = hcl2.load(fh)\n"
        "print(json.dumps(out))\n"
    )
    p = run([infra_tool("python"), "-c", script, *map(str, tf_files())])
    assert p.returncode == 0, p.stderr[-3000:]
    return {str(Path(k).relative_to(TERRAFORM)): v for k, v in json.loads(p.stdout).items()}


def test_terraform_parses(tf_parsed):
    assert {f"{c}/{n}.tf" for c in ("aws", "gcp", "azure") for n in ("main", "variables", "versions", "outputs")} \
        <= set(tf_parsed)
    for cloud in ("aws", "gcp", "azure"):
        names = {k for blk in tf_parsed[f"{cloud}/variables.tf"]["variable"] for k in blk}
        assert "orchestrator_id" in names


def test_checkov_terraform(infra_tool):
    res = _checkov(infra_tool("checkov"), TERRAFORM, ["terraform"])
    _assert_checkov_clean(res)
    scanned = {Path(c["file_path"]).parts[1] for c in res["passed"]}
    assert scanned == {"aws", "gcp", "azure"}


def _first(v):
    while isinstance(v, list) and len(v) == 1:
        v = v[0]
    return v


def _flat(v) -> list:
    if isinstance(v, list):
        return [x for item in v for x in _flat(item)]
    return [v]


def test_aws_policy_is_least_privilege(tf_parsed):
    docs = [blk["aws_iam_policy_document"]["orchestrator"] for blk in tf_parsed["aws/main.tf"]["data"]
            if "orchestrator" in blk.get("aws_iam_policy_document", {})]
    (doc,) = docs
    statements = {_first(s["sid"]): s for s in doc["statement"]}

    def conditions(s):
        return {(_first(c["variable"]), _first(c["test"])): _flat(c["values"]) for c in s.get("condition", [])}

    for sid, s in statements.items():
        actions = _flat(s["actions"])
        assert not any(a == "*" or a.endswith(":*") for a in actions), f"{sid}: wildcard action"
        if _flat(s["resources"]) == ["*"]:
            assert all(a.startswith("ec2:Describe") for a in actions), f"{sid}: only Describe* may use *"
    ours = ["${var.orchestrator_id}"]
    run_tagged = statements["RunInstancesOnlyWithOurTag"]
    assert conditions(run_tagged)[("aws:RequestTag/orchestrator-id", "StringEquals")] == ours
    assert "local.created" in str(run_tagged["resources"])
    tag = conditions(statements["TagOnlyAtLaunch"])
    assert tag[("ec2:CreateAction", "StringEquals")] == ["RunInstances"]
    assert tag[("aws:RequestTag/orchestrator-id", "StringEquals")] == ours
    term = statements["TerminateOnlyOurInstances"]
    assert _flat(term["actions"]) == ["ec2:TerminateInstances"]
    assert conditions(term)[("aws:ResourceTag/orchestrator-id", "StringEquals")] == ours
    assert "ec2:DescribeSpotPriceHistory" in _flat(statements["Inventory"]["actions"])
    passrole = statements["PassOnlyTheRunnerRole"]
    assert _flat(passrole["resources"]) == ["${aws_iam_role.runner.arn}"]
    # Everything else must not name instance creation or termination.
    for sid, s in statements.items():
        if sid not in ("RunInstancesOnlyWithOurTag", "RunInstancesReferencedResources"):
            assert "ec2:RunInstances" not in _flat(s["actions"])
    # The runner role exists only to be passed: no policy may be attached to it.
    text = (TERRAFORM / "aws" / "main.tf").read_text()
    assert "aws_iam_role.runner.name\n  policy_arn" not in text
    assert not re.search(r'role\s*=\s*aws_iam_role\.runner\.(name|id)\s*\n\s*policy', text)


def test_gcp_role_permissions(tf_parsed):
    roles = [blk["google_project_iam_custom_role"]["orchestrator"] for blk in tf_parsed["gcp/main.tf"]["resource"]
             if "google_project_iam_custom_role" in blk]
    perms = set(_flat(roles[0]["permissions"]))
    assert perms == {
        "compute.disks.create", "compute.disks.setLabels", "compute.images.useReadOnly",
        "compute.instances.create", "compute.instances.delete", "compute.instances.get",
        "compute.instances.list", "compute.instances.setLabels", "compute.instances.setMetadata",
        "compute.instances.setServiceAccount", "compute.subnetworks.use",
        "compute.subnetworks.useExternalIp", "compute.zoneOperations.get",
    }
    # actAs is granted on the runner account alone, never project-wide.
    project_roles = {_first(b["google_project_iam_member"][k]["role"])
                     for b in tf_parsed["gcp/main.tf"]["resource"] if "google_project_iam_member" in b
                     for k in b["google_project_iam_member"]}
    assert not any("serviceAccountUser" in r for r in project_roles)


def test_azure_role_actions(tf_parsed):
    defs = {k: v for blk in tf_parsed["azure/main.tf"]["resource"]
            for k, v in blk.get("azurerm_role_definition", {}).items()}
    actions = set(_flat(defs["orchestrator"]["permissions"][0]["actions"]))
    assert not any("*" in a for a in actions)
    assert {"Microsoft.Compute/virtualMachines/read", "Microsoft.Compute/virtualMachines/write",
            "Microsoft.Compute/virtualMachines/delete", "Microsoft.Compute/disks/delete",
            "Microsoft.Network/networkInterfaces/delete"} <= actions
    assert not any(a.startswith("Microsoft.Authorization/") for a in actions)
    join = set(_flat(defs["subnet_join"]["permissions"][0]["actions"]))
    assert "Microsoft.Network/virtualNetworks/subnets/join/action" in join
    assert _flat(defs["subnet_join"]["assignable_scopes"]) == ["${var.subnet_id}"]


# --- GitHub App manifest --------------------------------------------------------


def test_github_app_manifest():
    m = json.loads((INFRA / "github-app" / "manifest.json").read_text())
    assert m["default_permissions"] == {
        "actions": "write",
        "administration": "write",
        "organization_self_hosted_runners": "write",
        "metadata": "read",
    }
    assert m["default_events"] == ["workflow_job"]
    assert m["public"] is False
    assert m["hook_attributes"]["url"].endswith("/webhook")
    assert m["hook_attributes"].get("active", True) is True
    assert m["name"] and m["url"].startswith("https://")


# --- docs ------------------------------------------------------------------------


def test_operations_docs_cover_the_runbook():
    ops = (REPO / "docs" / "operations.md").read_text()
    for needle in ("pg_dump", ".backup", "rolling", "migration", "webhook secret", "admin_tokens",
                   "private key", "orchestrator_budget_spent_usd", "orchestrator_webhook_to_launch_seconds"):
        assert needle.lower() in ops.lower(), f"operations.md lacks {needle!r}"
    trouble = (REPO / "docs" / "troubleshooting.md").read_text()
    for needle in ("/api/v1/jobs", "budget:", "capacity", "github:rate_limited", "paused", "max_runners",
                   "preflight", "terminat"):
        assert needle in trouble, f"troubleshooting.md lacks {needle!r}"
