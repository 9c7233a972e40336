"""Pod addresses of the test cluster: one per pod, never shared by two live pods or two node agents."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest

from tests.cluster.harness.network import HOSTS, LOOPBACK_RANGE, POD_RANGE, PodNetwork


def test_each_pod_gets_its_own_address_until_it_ends(tmp_path: Path) -> None:
    net = PodNetwork(str(POD_RANGE), tmp_path)
    a, b = net.claim("a"), net.claim("b")
    assert ip_address(a) in POD_RANGE and a != b and net.claim("a") == a
    net.release("a")
    assert net.claim("c") == a, "an ended pod's address goes to the next pod"


def test_a_restarted_agent_keeps_a_pods_reported_address_when_it_is_free(tmp_path: Path) -> None:
    net = PodNetwork(str(POD_RANGE), tmp_path)
    mine = str(net.block.network_address + 9)
    assert net.claim("a", mine) == mine
    assert net.claim("b", mine) != mine, "taken by a"
    assert net.claim("c", "127.0.0.1") != "127.0.0.1", "not in this agent's block"


def test_two_live_agents_never_hand_out_the_same_address(tmp_path: Path) -> None:
    first, second = PodNetwork(str(POD_RANGE), tmp_path), PodNetwork(str(POD_RANGE), tmp_path)
    assert first.block != second.block and first.claim("a") != second.claim("a")


def test_loopback_addresses_skip_the_hosts_own(tmp_path: Path) -> None:
    net = PodNetwork(str(LOOPBACK_RANGE), tmp_path)
    assert not net.claim("a").startswith("127.0.0.")


def test_running_out_of_addresses_says_so(tmp_path: Path) -> None:
    net = PodNetwork(str(POD_RANGE), tmp_path)
    for i in HOSTS:
        net.claim(str(i))
    with pytest.raises(RuntimeError, match="no free pod address"):
        net.claim("one-too-many")
