"""Two nodes: a 2-node torchrun dump with c10d rendezvous over gloo, one node in each of two network namespaces
joined by a veth pair (loopback-range addresses, 127.77.x.0/24), equals a single-process dump byte for byte:
into one shared cache folder (as nodes sharing a network file system), and into an S3 bucket served by
SeaweedFS from node 0's namespace, which node 1 reaches over the veth pair only.
"""
from __future__ import annotations

import json
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


def two_node_dump(teacher, out, namespaces, extra_args=(), extra_env=None) -> list[str]:
    """Run the 2-node dump, one torchrun agent per namespace; returns their outputs."""
    master = namespaces[0][2]
    nodes = []
    for ns, link, address in namespaces:
        env = {**os.environ, **ALLOC_ENV, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": link, **(extra_env or {})}
        # --local_addr: the namespaces share one hostname, which resolves to neither veth address
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={master}:{PORT}",
               "--rdzv_id=dive-two-nodes", f"--local_addr={address}", "-m", "stages.cli", "cache", "--teacher",
               str(teacher), "--set", "views=3", "--out", str(out), *extra_args]
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
    return outputs


def test_two_node_dump_over_two_namespaces_equals_a_single_process_dump(small_cache, tmp_path, two_namespaces):
    teacher, cache = small_cache
    out = tmp_path / "two-nodes"
    two_node_dump(teacher, out, two_namespaces)
    assert_same_store(cache / "logits.zarr", out / "logits.zarr")


def test_two_nodes_dump_into_one_bucket_byte_for_byte(small_cache, tmp_path, two_namespaces):
    teacher, cache = small_cache
    ns0, _, address = two_namespaces[0]
    sys.path.insert(0, str(REPO / "scripts"))
    from seaweed_server import CREDENTIALS, command, stop

    folder = tmp_path / "weed"
    folder.mkdir()
    ports = {"s3": 18333, "master": 19333, "volume": 18080, "filer": 18888}  # a fresh namespace: all free
    server = subprocess.Popen(["ip", "netns", "exec", ns0, *command(folder, address, ports)],
                              stdout=open(tmp_path / "weed.log", "w"), stderr=subprocess.STDOUT)
    endpoint = f"http://{address}:{ports['s3']}"
    env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
    try:
        # wait for it and make the bucket from inside node 0's namespace, where the server is
        ready = ("import sys; sys.path.insert(0, sys.argv[2]); from seaweed_server import *; "
                 "wait_until_serving(sys.argv[1]); make_bucket('nodes', sys.argv[1])")
        made = subprocess.run(["ip", "netns", "exec", ns0, sys.executable, "-c", ready, endpoint,
                               str(REPO / "scripts")], timeout=240, env={**os.environ, **env},
                              capture_output=True, text=True)
        assert made.returncode == 0, made.stderr[-2000:] + (tmp_path / "weed.log").read_text()[-3000:]
        out = tmp_path / "two-nodes-s3"
        two_node_dump(teacher, out, two_namespaces, ("--store-url", "s3://nodes"), env)
        read = ("import s3fs, sys, json\n"
                "fs = s3fs.S3FileSystem(client_kwargs={'endpoint_url': sys.argv[1]})\n"
                "prefix = sys.argv[2]\n"
                "print(json.dumps({k[len(prefix) + 1:]: fs.cat_file(k).hex() for k in fs.find(prefix)}))\n")
        prefix = f"nodes/{out.parent.name}/{out.name}/logits.zarr"
        listing = subprocess.run(["ip", "netns", "exec", ns0, sys.executable, "-c", read, endpoint, prefix],
                                 check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout
        remote = {name: bytes.fromhex(data) for name, data in json.loads(listing).items()}
        local = {str(p.relative_to(cache / "logits.zarr")): p.read_bytes()
                 for p in (cache / "logits.zarr").rglob("*") if p.is_file()}
        assert set(remote) == set(local)
        assert all(remote[name] == local[name] for name in local)
    finally:
        stop(server)
