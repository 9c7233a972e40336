"""The test cluster behaves like a real one: pods run, Jobs complete, the scheduler places GPU pods,
faults are injected, and S3 objects outlive a server restart."""

from __future__ import annotations

import signal
import sys
import textwrap
import time
import urllib.request
from ipaddress import ip_address
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.harness import build
from tests.cluster.harness.cluster import Cluster
from tests.cluster.harness.network import LOOPBACK_RANGE, POD_RANGE
from tests.cluster.harness.nodes import GPU_RESOURCE, GPU_TOLERATION
from tests.cluster.harness.procs import wait_for
from tests.cluster.harness.s3 import S3Server

pytestmark = pytest.mark.cluster


def pod(name: str, code: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", textwrap.dedent(code)]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def job(name: str, code: str, backoff: int = 0, **spec: Any) -> dict[str, Any]:
    template = pod(name, code, **spec)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff, "template": {"spec": template["spec"]}},
    }


def logs(cluster: Cluster, namespace: str, name: str) -> str:
    return cluster.kubectl("logs", "-n", namespace, name).stdout


def test_pod_succeeds_and_logs_reach_kubectl(cluster: Cluster, namespace: str) -> None:
    cluster.core().create_namespaced_pod(namespace, pod("hello", "print('hello from a pod')"))
    done = cluster.wait_pod(namespace, "hello", ["Succeeded", "Failed"])
    assert done.status.phase == "Succeeded"
    assert done.status.container_statuses[0].state.terminated.exit_code == 0
    assert done.spec.node_name == "cpu-0"
    assert "hello from a pod" in logs(cluster, namespace, "hello")


def test_failing_pod_reports_its_exit_code(cluster: Cluster, namespace: str) -> None:
    cluster.core().create_namespaced_pod(namespace, pod("fails", "import sys; sys.exit(3)"))
    done = cluster.wait_pod(namespace, "fails", ["Succeeded", "Failed"])
    assert done.status.phase == "Failed"
    terminated = done.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")


def test_env_volumes_and_service_account_token(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"greeting": "hi", "a": "1"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "sec"}, "stringData": {"password": "s3cret"}})
    code = """
        import json, os, ssl, urllib.request
        mounts = json.loads(os.environ["FEDTUNE_MOUNTS"])
        assert os.environ["GREETING"] == "hi" and os.environ["PASSWORD"] == "s3cret", os.environ
        assert os.environ["POD_NAME"] == "env" and os.environ["POD_NS"] == os.environ["EXPECT_NS"]
        assert os.environ["CFG_a"] == "1" and os.environ["COMBINED"] == "hi-env"
        assert open("/etc/secret/password".replace("/etc/secret", mounts["/etc/secret"])).read() == "s3cret"
        assert open(os.environ["CONFIG_FILE"]).read() == "hi"
        assert open(mounts["/etc/podinfo"] + "/name").read() == "env"
        sa = mounts["/var/run/secrets/kubernetes.io/serviceaccount"]
        token = open(sa + "/token").read()
        ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        req = urllib.request.Request(
            f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
            data=b'{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}',
            headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        print(json.load(urllib.request.urlopen(req, context=ctx))["status"]["userInfo"]["username"])
    """
    env = [
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "EXPECT_NS", "value": namespace},
        {"name": "COMBINED", "value": "$(GREETING)-$(POD_NAME)"},
        {"name": "CONFIG_FILE", "value": "/etc/config/greeting"},
    ]
    mounts = [
        {"name": "secret", "mountPath": "/etc/secret"},
        {"name": "config", "mountPath": "/etc/config"},
        {"name": "podinfo", "mountPath": "/etc/podinfo"},
    ]
    volumes = [
        {"name": "secret", "secret": {"secretName": "sec"}},
        {"name": "config", "configMap": {"name": "cfg"}},
        {
            "name": "podinfo",
            "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]},
        },
    ]
    container = {
        "env": env,
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "volumeMounts": mounts,
    }
    core.create_namespaced_pod(namespace, pod("env", code, container=container, volumes=volumes))
    done = cluster.wait_pod(namespace, "env", ["Succeeded", "Failed"])
    out = logs(cluster, namespace, "env")
    assert done.status.phase == "Succeeded", out
    assert f"system:serviceaccount:{namespace}:default" in out


def test_missing_secret_keeps_the_container_waiting(cluster: Cluster, namespace: str) -> None:
    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    cluster.core().create_namespaced_pod(namespace, pod("waits", "print(1)", container={"env": env}))

    def waiting_reason() -> str | None:
        statuses = cluster.core().read_namespaced_pod("waits", namespace).status.container_statuses or []
        return statuses[0].state.waiting.reason if statuses and statuses[0].state.waiting else None

    assert wait_for(lambda: waiting_reason() == "CreateContainerConfigError", 30, "config error")
    cluster.core().create_namespaced_secret(namespace, {"metadata": {"name": "absent"}, "stringData": {"k": "v"}})
    assert cluster.wait_pod(namespace, "waits", ["Succeeded", "Failed"]).status.phase == "Succeeded"


def test_on_failure_restarts_the_container(cluster: Cluster, namespace: str) -> None:
    code = """
        import os, sys
        marker = os.path.join(os.environ["FEDTUNE_POD_DIR"], "ran-once")
        if not os.path.exists(marker):
            open(marker, "w").close()
            sys.exit(1)
    """
    cluster.core().create_namespaced_pod(namespace, pod("retry", code, restartPolicy="OnFailure"))
    done = cluster.wait_pod(namespace, "retry", ["Succeeded", "Failed"])
    status = done.status.container_statuses[0]
    assert done.status.phase == "Succeeded"
    assert status.restart_count == 1 and status.last_state.terminated.exit_code == 1


def test_job_completes_and_deleting_it_collects_its_pods(cluster: Cluster, namespace: str) -> None:
    batch, core = cluster.batch(), cluster.core()
    batch.create_namespaced_job(namespace, job("work", "print('done')"))
    wait_for(lambda: (batch.read_namespaced_job("work", namespace).status.succeeded or 0) == 1, 90, "job success")
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=work").items
    assert [p.status.phase for p in pods] == ["Succeeded"]
    batch.delete_namespaced_job("work", namespace, propagation_policy="Background")
    wait_for(lambda: not core.list_namespaced_pod(namespace, label_selector="job-name=work").items, 60, "pod GC")


def test_gpu_pod_lands_on_h100_and_too_large_one_stays_pending(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    sleep = "import time; time.sleep(600)"
    for name, gpus in (("eight", 8), ("sixteen", 16)):
        container = {"resources": {"limits": {GPU_RESOURCE: str(gpus)}}}
        core.create_namespaced_pod(namespace, pod(name, sleep, container=container, tolerations=[GPU_TOLERATION]))
    running = cluster.wait_pod(namespace, "eight", ["Running"])
    assert running.spec.node_name == "gpu-h100-0"

    def unschedulable() -> Any:
        conds = core.read_namespaced_pod("sixteen", namespace).status.conditions or []
        return next((c for c in conds if c.type == "PodScheduled" and c.reason == "Unschedulable"), None)

    cond = wait_for(unschedulable, 30, "the scheduler's verdict")
    assert f"Insufficient {GPU_RESOURCE}" in cond.message
    assert core.read_namespaced_pod("sixteen", namespace).status.phase == "Pending"
    core.delete_namespaced_pod("eight", namespace, grace_period_seconds=1)


def test_killing_a_job_pod_makes_the_job_replace_it(cluster: Cluster, namespace: str) -> None:
    batch, core = cluster.batch(), cluster.core()
    batch.create_namespaced_job(namespace, job("victim", "import time; time.sleep(600)", backoff=2))

    def pods() -> list[Any]:
        return core.list_namespaced_pod(namespace, label_selector="job-name=victim").items

    first = wait_for(lambda: [p for p in pods() if p.status.phase == "Running"], 60, "a running pod")[0]
    cluster.kill_pod(namespace, first.metadata.name)
    dead = cluster.wait_pod(namespace, first.metadata.name, ["Failed"])
    assert dead.status.container_statuses[0].state.terminated.exit_code == 128 + signal.SIGKILL
    wait_for(lambda: any(p.metadata.name != first.metadata.name for p in pods()), 60, "a replacement pod")
    batch.delete_namespaced_job("victim", namespace, propagation_policy="Background")


def test_graceful_deletion_sends_sigterm_then_sigkill(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    polite = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(0)))
        print("ready", flush=True)
        time.sleep(600)
    """
    stubborn = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """
    core.create_namespaced_pod(namespace, pod("polite", polite))
    core.create_namespaced_pod(namespace, pod("stubborn", stubborn))
    for name in ("polite", "stubborn"):
        cluster.wait_pod(namespace, name, ["Running"])
        wait_for(lambda n=name: "ready" in logs(cluster, namespace, n), 30, "the handler installed")
    folder = cluster.pod_folder(namespace, "polite")
    start = time.monotonic()
    core.delete_namespaced_pod("polite", namespace, grace_period_seconds=30)
    core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=2)

    def gone(name: str) -> bool:
        return not any(p.metadata.name == name for p in core.list_namespaced_pod(namespace).items)

    wait_for(lambda: gone("polite"), 20, "polite pod deleted")
    assert time.monotonic() - start < 20
    assert "got SIGTERM" in (folder / "logs" / "main.log").read_text()
    wait_for(lambda: gone("stubborn"), 30, "stubborn pod killed after its grace period")


def test_node_fault_injection(cluster: Cluster, namespace: str) -> None:
    node = "gpu-a100-1"
    core = cluster.core()
    cluster.make_node_not_ready(node)
    try:

        def tainted() -> bool:
            taints = core.read_node(node).spec.taints or []
            return any(t.key == "node.kubernetes.io/not-ready" for t in taints)

        wait_for(tainted, 60, "the node controller's not-ready taint")
    finally:
        cluster.make_node_ready(node)
    wait_for(lambda: cluster.node_ready(node) == "True", 30, "node ready again")


def sleeper_on(cluster: Cluster, namespace: str, name: str, node: str) -> int:
    """A long-sleeping pod pinned to a GPU node, once Running; returns its process id."""
    spec = pod(name, "import time; time.sleep(600)", nodeSelector={"kubernetes.io/hostname": node})
    spec["spec"]["tolerations"] = [GPU_TOLERATION]
    cluster.core().create_namespaced_pod(namespace, spec)
    cluster.wait_pod(namespace, name, ["Running"])
    return cluster.pod_pid(namespace, name)


def test_deleted_node_kills_its_pods_and_comes_back(cluster: Cluster, namespace: str) -> None:
    pid = sleeper_on(cluster, namespace, "doomed", "gpu-a100-1")
    cluster.delete_node("gpu-a100-1")
    try:
        wait_for(lambda: not _alive(pid), 30, "the pod's process to die with its node")
    finally:
        cluster.restore_node("gpu-a100-1")
    wait_for(lambda: cluster.node_ready("gpu-a100-1") == "True", 30, "the node registered again")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_s3_object_survives_restart(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="rounds/0/global.safetensors", Body=b"weights" * 1000)
    endpoint = s3_server.endpoint
    s3_server.stop()
    with pytest.raises(Exception):  # noqa: B017 - any connection error will do
        s3_server.client().list_buckets()
    s3_server.start()
    assert s3_server.endpoint == endpoint
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="rounds/0/global.safetensors")["Body"].read()
    assert body == b"weights" * 1000


def test_warm_start_builds_nothing_and_is_fast(cluster: Cluster) -> None:
    start = time.monotonic()
    assert build.ensure(verbose=False) == {}
    assert time.monotonic() - start < 5
    print(f"cluster start timings: {cluster.timings}", file=sys.stderr)
    assert cluster.timings["start_s"] < 30


def test_kubectl_works_with_the_kubeconfig(cluster: Cluster) -> None:
    out = cluster.kubectl("get", "nodes", "-o", "name").stdout.split()
    assert sorted(out) == ["node/cpu-0", "node/gpu-a100-0", "node/gpu-a100-1", "node/gpu-h100-0"]
    version = client.VersionApi(cluster.api_client()).get_code()
    assert version.git_version.startswith("v1.")


def test_active_deadline_fails_the_pod(cluster: Cluster, namespace: str) -> None:
    spec = pod("late", "import time; time.sleep(600)", activeDeadlineSeconds=2, terminationGracePeriodSeconds=1)
    cluster.core().create_namespaced_pod(namespace, spec)
    done = cluster.wait_pod(namespace, "late", ["Failed", "Succeeded"], timeout=60)
    assert (done.status.phase, done.status.reason) == ("Failed", "DeadlineExceeded")


def test_each_pod_serves_its_declared_port_on_its_own_address(cluster: Cluster, namespace: str) -> None:
    code = """
        import http.server, os
        http.server.HTTPServer((os.environ["POD_IP"], 9090), http.server.SimpleHTTPRequestHandler).serve_forever()
    """
    container = {
        "ports": [{"name": "metrics", "containerPort": 9090}],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
    }
    core = cluster.core()
    for name in ("a", "b"):
        core.create_namespaced_pod(
            namespace, pod(name, code, container=container) | {"metadata": {"name": name, "labels": {"app": "web"}}}
        )
    service = {
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "metrics", "port": 80, "targetPort": "metrics"}]},
    }
    core.create_namespaced_service(namespace, service)
    addresses = {name: cluster.pod_ip(namespace, name) for name in ("a", "b")}
    assert addresses["a"] != addresses["b"]
    assert all(ip_address(a) in (POD_RANGE if cluster.pods_routed else LOOPBACK_RANGE) for a in addresses.values())
    for address in addresses.values():
        wait_for(lambda a=address: urllib.request.urlopen(f"http://{a}:9090/", timeout=2).status == 200, 30, "serving")

    def endpoints() -> set[tuple[str, int]]:
        slices = client.DiscoveryV1Api(cluster.api_client()).list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=web"
        )
        return {
            (address, port.port)
            for s in slices.items
            for e in s.endpoints or []
            if e.conditions.ready
            for address in e.addresses
            for port in s.ports or []
        }

    if not cluster.pods_routed:
        pytest.skip("pod addresses are loopback ones here (routing 198.19.0.0/16 locally needs root): no Endpoints")
    want = {(a, 9090) for a in addresses.values()}
    wait_for(lambda: endpoints() == want, 60, f"the Service's endpoints to be {want}")


def test_unreachable_node_stops_reporting_until_it_returns(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    pid = sleeper_on(cluster, namespace, "cut-off", "gpu-a100-0")
    cluster.make_node_unreachable("gpu-a100-0")
    try:
        wait_for(lambda: cluster.node_agent_mode("gpu-a100-0") == "unreachable", 30, "the agent to notice")
        core.delete_namespaced_pod("cut-off", namespace, grace_period_seconds=5)
        wait_for(lambda: core.read_namespaced_pod("cut-off", namespace).metadata.deletion_timestamp, 10, "deleting")
        assert _alive(pid)
        assert core.read_namespaced_pod("cut-off", namespace).metadata.deletion_timestamp is not None
    finally:
        cluster.make_node_ready("gpu-a100-0")
    wait_for(lambda: not _alive(pid), 30, "the process stopped once the node is back")


def test_not_ready_node_evicts_pods_after_their_toleration(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    spec = pod("evicted", "import time; time.sleep(600)", nodeSelector={"kubernetes.io/hostname": "gpu-a100-1"})
    not_ready = {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}
    spec["spec"]["tolerations"] = [GPU_TOLERATION, {**not_ready, "tolerationSeconds": 1}]
    core.create_namespaced_pod(namespace, spec)
    cluster.wait_pod(namespace, "evicted", ["Running"])
    pid = cluster.pod_pid(namespace, "evicted")
    cluster.make_node_not_ready("gpu-a100-1")
    try:
        wait_for(lambda: not core.list_namespaced_pod(namespace).items, 60, "the taint manager's eviction")
        assert not _alive(pid)
    finally:
        cluster.make_node_ready("gpu-a100-1")


def test_init_container_and_container_paths(cluster: Cluster, namespace: str) -> None:
    writer = {
        "name": "init",
        "image": "python:3.11",
        "command": ["python", "-c", "import sys; open(sys.argv[1], 'w').write('from init')", "/work/hello.txt"],
        "volumeMounts": [{"name": "work", "mountPath": "/work"}],
    }
    reader = """
        import os, sys
        assert os.environ["HOME"] == os.path.realpath(os.getcwd()), (os.environ["HOME"], os.getcwd())
        print(open(sys.argv[1].split("=", 1)[1]).read(), open("hello.txt").read())
    """
    spec = pod(
        "paths",
        reader,
        container={
            "args": ["--config=/work/hello.txt"],
            "workingDir": "/work",
            "env": [{"name": "HOME", "value": "/work"}],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}],
        },
        initContainers=[writer],
        volumes=[{"name": "work", "emptyDir": {}}],
    )
    cluster.core().create_namespaced_pod(namespace, spec)
    done = cluster.wait_pod(namespace, "paths", ["Succeeded", "Failed"])
    out = logs(cluster, namespace, "paths")
    assert done.status.phase == "Succeeded", out
    assert done.status.init_container_statuses[0].state.terminated.exit_code == 0
    assert out.strip() == "from init from init"
