"""The whole cluster path in one command (`make cluster-demo`): CRDs, the operator, the quickstart, a live view.

Expects the test cluster from `make cluster-up` (kubeconfig in .cluster/, Secret default/fedtune-s3).
The operator runs as a local process here (the test cluster has no image registry); on a real cluster
it is installed with `helm install fedtune charts/fedtune`.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / ".cluster"
KUBECONFIG = STATE / "kubeconfig"
EXAMPLE = REPO / "examples" / "cluster" / "quickstart.yaml"
TIMEOUT_SECONDS = 900


def kubectl(*args: str, check: bool = True) -> str:
    out = subprocess.run(["kubectl", f"--kubeconfig={KUBECONFIG}", *args], capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        sys.exit(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def upload_data() -> None:
    """Put the example's client data where examples/cluster/quickstart.yaml reads it."""
    secret = json.loads(kubectl("get", "secret", "fedtune-s3", "-n", "default", "-o", "json"))
    env = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    for f in sorted((REPO / "examples" / "data").glob("*.jsonl")):
        s3.put_object(Bucket="fedtune", Key=f"data/{f.name}", Body=f.read_bytes())


def start_operator() -> None:
    pidfile = STATE / "operator.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), 0)
            return
        except (OSError, ValueError):
            pass
    log = (STATE / "operator.log").open("ab")
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune", "operator", "--standalone"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    pidfile.write_text(str(proc.pid))
    print(f"operator started (pid {proc.pid}, log {STATE / 'operator.log'})")


def _without_age(row: str) -> str:
    return row.rsplit(None, 1)[0] if row else ""


def watch(name: str) -> str:
    """Print the resource's row whenever it changes, until it ends; returns its final state."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    last = ""
    while time.monotonic() < deadline:
        table = kubectl("get", "fft", name, check=False)
        row = table.strip().splitlines()[-1] if table.strip() else ""
        if _without_age(row) != _without_age(last):
            if not last:
                print(table.strip().splitlines()[0])
            print(row, flush=True)
            last = row
        state = kubectl("get", "fft", name, "-o", "jsonpath={.status.state}", check=False)
        if state in ("Succeeded", "Failed"):
            return state
        time.sleep(1)
    return "TimedOut"


def main() -> None:
    if not KUBECONFIG.exists():
        sys.exit("no cluster: run `make cluster-up` first")
    kubectl("apply", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "federatedfinetunes.fedtune.io")
    upload_data()
    start_operator()
    kubectl("delete", "fft", "quickstart", "--ignore-not-found", "--wait=true")
    print(kubectl("apply", "-f", str(EXAMPLE)).strip())
    state = watch("quickstart")
    status = json.loads(kubectl("get", "fft", "quickstart", "-o", "json"))["status"]
    print(f"\nstate: {state}")
    for c in status.get("conditions", []):
        if c["status"] == "True":
            print(f"  {c['type']}: {c['reason']}: {c['message']}")
    if state == "Succeeded":
        print(f"final adapter: {status['adapterURI']}  (eval loss {status.get('finalEvalLoss')})")
    print(f"\nkubectl --kubeconfig={KUBECONFIG} get fft,jobs,pods   # stop everything: make cluster-down")
    sys.exit(0 if state == "Succeeded" else 1)


if __name__ == "__main__":
    main()
