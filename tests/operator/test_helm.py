"""The Helm chart: lints, renders valid objects in both RBAC scopes, grants only what the operator uses,
monitors only metrics that exist, and installs into the test cluster under restricted Pod Security."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from prometheus_client.metrics import MetricWrapperBase

from fedtune import metrics
from fedtune.api import API_GROUP, API_VERSION, PLURAL, FederatedFineTuneSpec
from fedtune.controller import builders
from tests.cluster.harness import podspec
from tests.cluster.harness.cluster import Cluster
from tests.operator.chart import CHART, helm, one, render
from tests.operator.conftest import Runs, running_pod, tiny_run
from tests.unit.runs import TRUST
from tests.unit.runs import run as run_resource

pytestmark = pytest.mark.cluster

NAMESPACED = ("--set", "rbac.scope=namespaced")
MONITORING = (
    "--set",
    "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true",
    "--set",
    "grafana.dashboards.enabled=true",
    "--set-json",
    'metrics.serviceMonitor.additionalLabels={"release":"kps"}',
    "--set-json",
    'metrics.podMonitor.additionalLabels={"release":"kps"}',
    "--set-json",
    'metrics.prometheusRule.additionalLabels={"release":"kps"}',
)
# Every rule the operator needs, and nothing more: (apiGroup, resource) -> verbs.
NAMESPACED_RULES = {
    ("fedtune.io", "federatedfinetunes"): {"get", "list", "watch", "patch", "delete"},
    ("fedtune.io", "federatedfinetunes/status"): {"patch"},
    ("fedtune.io", "federatedfinetunes/finalizers"): {"update"},
    ("fedtune.io", "federatedclients"): {"get", "list", "watch", "patch"},
    ("fedtune.io", "federatedclients/status"): {"patch"},
    ("batch", "jobs"): {"create", "get", "list", "watch", "patch", "delete"},
    ("kueue.x-k8s.io", "workloads"): {"create", "get", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "configmaps"): {"create", "get"},
    ("", "services"): {"create", "get"},
    ("", "secrets"): {"list", "create"},
    ("", "events"): {"create", "patch"},
}
CLUSTER_READS = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"list", "watch"},
    ("kueue.x-k8s.io", "resourceflavors"): {"get"},
}
PEERING_VERBS = {"get", "list", "watch", "patch"}
STORE = {"to": [{"ipBlock": {"cidr": "10.20.0.0/24"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
NETWORK_POLICY = (
    "--set",
    "networkPolicy.enabled=true",
    "--set-json",
    f"networkPolicy.storageEgress=[{json.dumps(STORE)}]",
)


def grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs; a resource granted by two rules is a failure."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) not in out, f"{group}/{resource} granted twice"
                out[(group, resource)] = set(rule["verbs"])
    return out


def args(deployment: dict[str, Any]) -> list[str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["fedtune", "operator"]
    return list(container["args"])


def known_metrics() -> dict[str, str]:
    """Series name -> metric family, for what fedtune exports (counters as _total, histograms in three)."""
    names: dict[str, str] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            names.update({family.name + s: family.name for s in suffixes})
    return names


def used_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bfedtune_[a-z0-9_]+", text))


@pytest.mark.parametrize(
    "values", [(), NAMESPACED, ("--set", "replicas=3"), MONITORING], ids=["default", "namespaced", "ha", "monitoring"]
)
def test_chart_lints(values: tuple[str, ...]) -> None:
    done = helm("lint", "--strict", str(CHART), *values, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_default_values_render_a_cluster_wide_standalone_operator() -> None:
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "Service", "Deployment"]
    )
    deployment = one(docs, "Deployment")
    assert args(deployment) == ["--standalone", "--metrics-port=8080"]
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    )
    role = one(docs, "ClusterRole")
    assert grants(role) == {**NAMESPACED_RULES, **CLUSTER_READS, ("kopf.dev", "clusterkopfpeerings"): PEERING_VERBS}
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ft-fedtune", "namespace": "fedtune-system"}]
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_namespaced_scope_uses_a_role_and_watches_only_its_namespace() -> None:
    docs = render(*NAMESPACED)
    assert args(one(docs, "Deployment")) == ["--standalone", "--metrics-port=8080", "--namespace=fedtune-system"]
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == "fedtune-system"
    assert grants(role) == {**NAMESPACED_RULES, ("kopf.dev", "kopfpeerings"): PEERING_VERBS}
    assert one(docs, "RoleBinding")["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    # CRDs and namespaces are cluster-scoped: a small ClusterRole reads them, and nothing else.
    assert grants(one(docs, "ClusterRole")) == CLUSTER_READS
    peering = one(docs, "KopfPeering")
    assert peering["metadata"]["namespace"] == "fedtune-system"


def test_replicas_get_distinct_peering_priorities() -> None:
    """Equal priorities would freeze every replica; each replica is a Deployment with its own."""
    docs = render("--set", "replicas=3", "--set", "priority=50", "--set", "peeringName=fedtune-ha")
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 3 and all(d["spec"]["replicas"] == 1 for d in deployments)
    all_args = [args(d) for d in deployments]
    assert all("--standalone" not in a and "--peering=fedtune-ha" in a for a in all_args)
    priorities = [next(x for x in a if x.startswith("--priority=")) for a in all_args]
    assert priorities == ["--priority=50", "--priority=49", "--priority=48"]
    assert len({d["metadata"]["name"] for d in deployments}) == 3
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "fedtune-ha"


@pytest.mark.parametrize("values", [(), NAMESPACED], ids=["cluster", "namespaced"])
def test_the_operator_pod_meets_restricted_pod_security(values: tuple[str, ...]) -> None:
    pod = one(render(*values), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
    assert all(set(v) - {"name"} == {"emptyDir"} for v in pod["volumes"])


def test_monitoring_objects_are_gated_and_labelled() -> None:
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & {d["kind"] for d in render()}
    docs = render(*MONITORING)
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        assert one(docs, kind)["metadata"]["labels"]["release"] == "kps", kind
    service_monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    pod_monitor = one(docs, "PodMonitor")
    # The run pods the operator creates carry these labels (controller.builders.labels).
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "fedtune",
        "app.kubernetes.io/managed-by": "fedtune-operator",
    }
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_alert_rules_are_valid_and_use_real_metrics(tmp_path: Path) -> None:
    rule = one(render(*MONITORING), "PrometheusRule")
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    used = used_metrics(exprs)
    assert used and used <= set(known_metrics()), used - set(known_metrics())
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def alert(severity: str, summary: str, description: str, **labels: str) -> dict[str, Any]:
    """One alert promtool should see firing: its labels and its rendered annotations."""
    return {
        "exp_labels": {"severity": severity, **labels},
        "exp_annotations": {"summary": summary, "description": description},
    }


def test_every_alert_fires_when_it_should_and_only_then(tmp_path: Path) -> None:
    """`promtool test rules` on the chart's rules, stalledFor 10m: each alert silent before its condition has
    lasted, firing after, and never for the run, client or operator that is fine."""
    rule = one(render(*MONITORING, "--set", "metrics.prometheusRule.stalledFor=10m"), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    run = 'namespace="ns",name="{}"'
    series = {
        f'fedtune_run_condition{{{run.format("broken")},state="Failed"}}': "0 0 0 1x20",
        f'fedtune_run_condition{{{run.format("fine")},state="Failed"}}': "0x23",
        f'fedtune_run_condition{{{run.format("stuck")},state="Running"}}': "1x40",
        f"fedtune_rounds_completed{{{run.format('stuck')}}}": "3x40",
        f'fedtune_run_condition{{{run.format("busy")},state="Running"}}': "1x40",
        f"fedtune_rounds_completed{{{run.format('busy')}}}": "0+1x40",
        f'fedtune_run_condition{{{run.format("slow")},state="Running"}}': "1x40",
        f"fedtune_rounds_completed{{{run.format('slow')}}}": " ".join(str(i // 5) for i in range(41)),  # 5 min a round
        f'fedtune_updates_rejected_total{{{run.format("busy")},client="bad"}}': "0 0 0 1x30",
        f'fedtune_updates_rejected_total{{{run.format("busy")},client="good"}}': "0x30",
        'up{job="ft-fedtune-metrics",instance="a"}': "1x10 0x30",
    }
    failed = alert(
        "warning",
        "FederatedFineTune ns/broken failed",
        "kubectl describe fft -n ns broken shows the reason.",
        namespace="ns",
        name="broken",
    )
    stalled = alert(
        "warning",
        "FederatedFineTune ns/stuck completed no round in 10m",
        "Clients may be unschedulable or failing; check the run's Jobs and pods.",
        namespace="ns",
        name="stuck",
    )
    rejected = alert(
        "info",
        "Client bad of ns/busy sent rejected updates",
        "Updates failed validation (shape, finiteness or norm bound) in the last hour.",
        namespace="ns",
        name="busy",
        client="bad",
    )
    down = alert(
        "critical",
        "The fedtune operator is not being scraped",
        "No fedtune operator replica answered on its metrics port for 10 minutes.",
    )
    cases = [
        ("2m", "FedtuneRunFailed", []),
        ("5m", "FedtuneRunFailed", [failed]),
        ("5m", "FedtuneRunStalled", []),  # stuck, but not for 10 minutes yet
        ("15m", "FedtuneRunStalled", [stalled]),
        ("2m", "FedtuneUpdatesRejected", []),
        ("5m", "FedtuneUpdatesRejected", [rejected]),
        ("15m", "FedtuneOperatorDown", []),  # down since 11m
        ("25m", "FedtuneOperatorDown", [down]),
    ]
    never_scraped = [("5m", "FedtuneOperatorDown", []), ("11m", "FedtuneOperatorDown", [down])]
    tests = [
        {
            "interval": "1m",
            "input_series": [{"series": k, "values": v} for k, v in inputs.items()],
            "alert_rule_test": [{"eval_time": t, "alertname": a, "exp_alerts": e} for t, a, e in checks],
        }
        for inputs, checks in ((series, cases), ({}, never_scraped))
    ]
    assert {c[1] for c in cases} == {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    path = tmp_path / "alerts_test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    done = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_run_pods_are_scraped_with_labels_from_the_pods_the_operator_made() -> None:
    """A run pod's own namespace, name and client labels give way to its namespace and the run and client
    labels the operator put on the pod, so no pod can report as another run or client."""
    endpoint = one(render(*MONITORING), "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert endpoint["honorLabels"] is False

    def meta(label: str) -> str:
        return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)

    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel == {"name": [meta(builders.RUN_LABEL)], "client": [meta(builders.CLIENT_LABEL)]}
    client_pod = builders.client_job(run_resource(), run_resource().spec.clients[0])["spec"]["template"]
    assert client_pod["metadata"]["labels"][builders.CLIENT_LABEL] == "clinic"
    assert client_pod["metadata"]["labels"][builders.RUN_LABEL] == "quickstart"


def test_run_pods_reach_only_dns_and_the_store_and_only_the_scraper_reaches_them() -> None:
    assert "NetworkPolicy" not in {d["kind"] for d in render()}
    docs = [d for d in render(*NETWORK_POLICY, "--set-json", 'networkPolicy.namespaces=["a","b"]')]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["a", "b"]
    res = run_resource()
    for pod in (j["spec"]["template"] for j in builders.children(res, TRUST) if j["kind"] == "Job"):
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for policy in policies:
            spec = policy["spec"]
            assert spec["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
            assert spec["policyTypes"] == ["Ingress", "Egress"]
            (ingress,) = spec["ingress"]
            assert ingress["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
            assert [p["port"] for p in ingress["ports"]] == ["metrics"] and "metrics" in ports
            dns, store = spec["egress"]
            assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
            assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
            assert store == STORE
    # The operator's own pod is not a run pod.
    operator_pod = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not policies[0]["spec"]["podSelector"]["matchLabels"].items() <= operator_pod.items()
    # Enabled without the store, or in cluster scope without the runs' namespaces, it names what is missing.
    done = helm("template", "ft", str(CHART), "--set", "networkPolicy.enabled=true", check=False)
    assert done.returncode != 0 and "networkPolicy.storageEgress" in done.stderr, done.stderr
    done = helm("template", "ft", str(CHART), *NETWORK_POLICY, check=False)
    assert done.returncode != 0 and "networkPolicy.namespaces" in done.stderr, done.stderr
    assert one(render(*NETWORK_POLICY, *NAMESPACED), "NetworkPolicy")["metadata"]["namespace"] == "fedtune-system"


def test_replicas_get_a_disruption_budget_covering_them_all() -> None:
    assert "PodDisruptionBudget" not in {d["kind"] for d in render()}
    docs = render("--set", "replicas=3")
    selector = one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    replicas = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"]
    assert len(replicas) == 3 and all(selector.items() <= labels.items() for labels in replicas)
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_default_images_are_the_ones_make_images_tags() -> None:
    """`make images` tags what the chart deploys (repository:appVersion) and what spec.image defaults to."""
    done = subprocess.run(["make", "-s", "image-names"], cwd=CHART.parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    operator = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    trainer = FederatedFineTuneSpec.model_fields["image"].default
    assert done.stdout.split() == [operator, trainer]


def test_grafana_dashboard_shows_fedtune_metrics() -> None:
    cm = one(render(*MONITORING), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    dashboard = json.loads(text)
    assert all(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    known, used = known_metrics(), used_metrics(text)
    assert used <= set(known), used - set(known)
    # Every metric family fedtune exports is on the dashboard.
    assert {known[u] for u in used} == set(known.values())


@pytest.mark.parametrize(
    "bad", ["rbac.scope=everywhere", "replicas=0", "metrics.port=80", "image.pullPolicy=Sometimes"]
)
def test_values_schema_rejects_bad_values(bad: str) -> None:
    done = helm("template", "ft", str(CHART), "--set", bad, check=False)
    assert done.returncode != 0
    assert bad.split("=")[0].split(".")[-1] in done.stderr, done.stderr


def test_helm_install_creates_working_rbac_and_restricted_pods(crds: Cluster) -> None:
    """Installed after the crds fixture (--skip-crds) into a namespace that enforces restricted Pod Security.

    The node agent cannot run the operator image, so the pod is kept unscheduled: that it exists at all
    shows admission accepted it.
    """
    ns = f"helm-{secrets.token_hex(3)}"
    core = crds.core()
    enforce = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}
    core.create_namespace({"metadata": {"name": ns, "labels": enforce}})
    kube = ("--kubeconfig", str(crds.kubeconfig), "--namespace", ns)
    try:
        done = helm(
            "install", "ft", str(CHART), *kube, "--skip-crds", *NAMESPACED, *NETWORK_POLICY,
            "--set", "grafana.dashboards.enabled=true", "--set", "replicas=2",
            "--set-json", 'nodeSelector={"fedtune.io/pool":"nowhere"}',
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "violate" not in done.stderr, done.stderr

        kinds = ("deployment", "serviceaccount", "role", "rolebinding", "service", "kopfpeering", "configmap")
        for kind in (*kinds, "networkpolicy", "poddisruptionbudget"):
            out = crds.kubectl("get", kind, "-n", ns, "-l", "app.kubernetes.io/instance=ft", "-o", "name").stdout
            assert out.strip(), f"no {kind} installed"

        deadline = time.monotonic() + 60
        pods: list[Any] = []
        while not pods and time.monotonic() < deadline:
            pods = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=operator").items
            if not pods:
                time.sleep(0.5)
        assert pods, "the operator Deployment created no pod: " + crds.kubectl("describe", "rs", "-n", ns).stdout

        sa = f"system:serviceaccount:{ns}:ft-fedtune"
        for verb, resource, allowed in [
            ("patch", "federatedfinetunes.fedtune.io --subresource=status", "yes"),
            ("update", "federatedfinetunes.fedtune.io --subresource=finalizers", "yes"),
            ("update", "federatedfinetunes.fedtune.io --subresource=status", "no"),
            ("patch", "federatedfinetunes.fedtune.io", "yes"),
            ("update", "federatedfinetunes.fedtune.io", "no"),
            ("create", "jobs.batch", "yes"),
            ("list", "secrets", "yes"),
            ("create", "secrets", "yes"),
            ("update", "secrets", "no"),
            ("delete", "secrets", "no"),
            ("create", "pods", "no"),
            ("patch", "kopfpeerings.kopf.dev", "yes"),
        ]:
            ask = ("auth", "can-i", verb, *resource.split(), "-n", ns, f"--as={sa}")
            got = crds.kubectl(*ask, check=False).stdout.strip()
            assert got == allowed, f"{verb} {resource}: {got}"
        elsewhere = crds.kubectl("auth", "can-i", "create", "jobs.batch", "-n", "default", f"--as={sa}", check=False)
        assert elsewhere.stdout.strip() == "no"
    finally:
        helm("uninstall", "ft", *kube, check=False)
        try:
            core.delete_namespace(ns)
        except ApiException as e:
            if e.status != 404:
                raise


@pytest.mark.slow
@pytest.mark.skipif(podspec.unshare_command() is None, reason="the node agent projects the token as root only")
@pytest.mark.parametrize("scope", ["namespaced", "cluster"])
def test_the_operator_helm_installs_runs_a_federation_as_a_pod(
    crds: Cluster, namespace: str, tiny_data: str, scope: str
) -> None:
    """`helm install`, then a run: the operator is a pod of the test cluster, signed in with the service-account
    token and CA the node agent projects, and takes the run to Succeeded; everything under restricted Pod
    Security. In cluster scope the release lives in a namespace of its own and watches the run's."""
    core = crds.core()
    restricted = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}
    core.patch_namespace(namespace, {"metadata": {"labels": restricted}})
    release_ns = namespace if scope == "namespaced" else f"ft-system-{secrets.token_hex(3)}"
    if release_ns != namespace:
        core.create_namespace({"metadata": {"name": release_ns, "labels": restricted}})
    kube = ("--kubeconfig", str(crds.kubeconfig), "--namespace", release_ns)
    runs = Runs(crds, namespace)
    try:
        done = helm("install", "ft", str(CHART), *kube, "--skip-crds", "--set", f"rbac.scope={scope}", check=False)
        assert done.returncode == 0 and "violate" not in done.stderr, done.stdout + done.stderr
        pod = running_pod(crds, release_ns, "app.kubernetes.io/component=operator")
        runs.create(tiny_run("in-cluster", aggregation={"rounds": 1}))
        status = runs.wait_state("in-cluster", "Succeeded", timeout=400)["status"]
        assert status["adapterSHA256"]
        log = crds.kubectl("logs", "-n", release_ns, pod).stdout
        assert "in-cluster" in log, log[-3000:]  # this pod reconciled it, signed in from inside
    finally:
        with contextlib.suppress(ApiException):
            runs.api.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, "in-cluster")
        helm("uninstall", "ft", *kube, "--wait", "--timeout", "60s", check=False)
        if release_ns != namespace:
            with contextlib.suppress(ApiException):
                core.delete_namespace(release_ns)
