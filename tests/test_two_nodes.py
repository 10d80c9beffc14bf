"""Two nodes: a 2-node torchrun dump with c10d rendezvous over gloo, one node in each of two network namespaces
joined by a veth pair (loopback-range addresses, 127.77.x.0/24), equals a single-process dump byte for byte.

The namespaces separate the network only: both nodes write their shards into one shared cache folder, as nodes
sharing a network file system do.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from .conftest import ALLOC_ENV, REPO, needs_fmnist
from .test_cache import assert_same_store

pytestmark = needs_fmnist
PORT = 29477


def _ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def two_namespaces():
    """Two network namespaces, node0 at 127.77.<k>.1 and node1 at 127.77.<k>.2, joined by a veth pair."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (apt-get install iproute2): cannot make network namespaces")
    k = os.getpid() % 250 + 1
    names = (f"dive{k}a", f"dive{k}b")
    links = (f"dv{k}a", f"dv{k}b")
    made = _ip("netns", "add", names[0])
    if made.returncode:
        pytest.skip(f"cannot create a network namespace here (needs root / CAP_SYS_ADMIN): {made.stderr.strip()}")
    try:
        assert not _ip("netns", "add", names[1]).returncode
        assert not _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1]).returncode
        for ns, link, host in zip(names, links, (1, 2)):
            assert not _ip("link", "set", link, "netns", ns).returncode
            # 127.x on a real interface needs route_localnet, in the namespace and on the link
            for key in ("all", link):
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.conf.{key}.route_localnet=1"],
                               check=True)
            assert not _ip("addr", "add", f"127.77.{k}.{host}/24", "dev", link, netns=ns).returncode
            assert not _ip("link", "set", link, "up", netns=ns).returncode
            assert not _ip("link", "set", "lo", "up", netns=ns).returncode
        yield [(ns, link, f"127.77.{k}.{host}") for ns, link, host in zip(names, links, (1, 2))]
    finally:
        for ns in names:
            _ip("netns", "del", ns)


def test_two_node_dump_over_two_namespaces_equals_a_single_process_dump(small_cache, tmp_path, two_namespaces):
    teacher, cache = small_cache
    out = tmp_path / "two-nodes"
    master = two_namespaces[0][2]
    nodes = []
    for ns, link, address in two_namespaces:
        env = {**os.environ, **ALLOC_ENV, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": link}
        # --local_addr: the namespaces share one hostname, which resolves to neither veth address
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={master}:{PORT}",
               "--rdzv_id=dive-two-nodes", f"--local_addr={address}", "-m", "stages.cli", "cache", "--teacher",
               str(teacher), "--set", "views=3", "--out", str(out)]
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output
    assert any("x2" in output for output in outputs)  # rank 0, on either node, reports one group of two
    assert_same_store(cache / "logits.zarr", out / "logits.zarr")
