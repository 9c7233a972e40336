"""The test cluster's kubelet puts service-account credentials where in-cluster clients look for them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cluster.harness import podspec

TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def test_other_mounts_run_the_command_as_it_is() -> None:
    assert podspec.in_own_mounts(["true"], {"/etc/fedtune": "/tmp/x"}) == ["true"]


@pytest.mark.skipif(podspec.unshare_command() is None, reason="needs root and mount namespaces")
def test_a_pod_sees_its_own_token_at_the_fixed_path_and_nothing_of_the_hosts(tmp_path: Path) -> None:
    pods = []
    for name in ("a", "b"):
        (folder := tmp_path / name).mkdir()
        (folder / "token").write_text(f"token of {name}")
        (single := tmp_path / f"{name}.ca").write_text(f"ca of {name}")
        pods.append({TOKEN_DIR: str(folder), "/var/run/secrets/extra/ca.crt": str(single)})
    read = f"cat {TOKEN_DIR}/token /var/run/secrets/extra/ca.crt; ls /var/run/secrets"
    outputs = [
        subprocess.run(podspec.in_own_mounts(["sh", "-c", read], m), capture_output=True, text=True, check=True)
        for m in pods
    ]
    assert [o.stdout for o in outputs] == [f"token of {n}ca of {n}extra\nkubernetes.io\n" for n in ("a", "b")]
    assert not Path(TOKEN_DIR).exists() and not Path("/var/run/secrets/extra").exists()  # nothing left on the host


@pytest.mark.skipif(podspec.unshare_command() is None, reason="needs root and mount namespaces")
def test_the_container_process_is_the_one_started_and_its_exit_code_comes_back(tmp_path: Path) -> None:
    argv = podspec.in_own_mounts(["sh", "-c", "echo $$; exit 7"], {TOKEN_DIR: str(tmp_path)})
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7 and int(out) == proc.pid
