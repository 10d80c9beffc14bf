"""The GPU bundle's pieces: a wheel larger than one transfer is cut and joined back byte for byte, checked by
SHA-256; a missing or damaged piece is named. (Building a bundle downloads from PyPI, so it is not run here.)"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_bundle  # noqa: E402


def make_bundle(tmp_path, piece: int = 1000):
    rng = np.random.default_rng(0)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    contents = {"big_pkg-1.0-py3-none-any.whl": rng.bytes(2 * piece + 345),
                "small_pkg-2.0-py3-none-any.whl": rng.bytes(piece // 2)}
    for name, data in contents.items():
        (wheels / name).write_bytes(data)
    entries = gpu_bundle.split_large(wheels, tmp_path / "pieces", piece)
    (tmp_path / "manifest.json").write_text(json.dumps({"wheels": entries}))
    return contents, entries


def test_a_large_wheel_is_cut_into_pieces_and_joined_back(tmp_path):
    contents, entries = make_bundle(tmp_path)
    assert len(entries["big_pkg-1.0-py3-none-any.whl"]["pieces"]) == 3
    assert entries["small_pkg-2.0-py3-none-any.whl"]["pieces"] == []
    assert not (tmp_path / "wheels" / "big_pkg-1.0-py3-none-any.whl").exists()  # only its pieces travel
    assert max(f.stat().st_size for f in tmp_path.rglob("*.whl*")) <= 1000
    joined = gpu_bundle.join(tmp_path)
    assert sorted(p.name for p in joined) == sorted(contents)
    for path in joined:
        assert path.read_bytes() == contents[path.name]
    assert gpu_bundle.join(tmp_path)  # joining again (wheels already whole) checks and keeps them


def test_a_missing_or_damaged_piece_is_named(tmp_path):
    make_bundle(tmp_path)
    piece = tmp_path / "pieces" / "big_pkg-1.0-py3-none-any.whl.part01"
    data = piece.read_bytes()
    piece.unlink()
    with pytest.raises(SystemExit, match="missing big_pkg-1.0-py3-none-any.whl.part01"):
        gpu_bundle.join(tmp_path)
    piece.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SystemExit, match="big_pkg-1.0-py3-none-any.whl: SHA-256 differs"):
        gpu_bundle.join(tmp_path)


def test_only_what_this_python_lacks_is_installed(tmp_path):
    wheels = [tmp_path / "numpy-2.1.0-cp311-cp311-manylinux_2_28_x86_64.whl",
              tmp_path / "no_such_dive_package-1.0-py3-none-any.whl"]
    assert gpu_bundle.distribution(wheels[1].name) == "no-such-dive-package"
    assert gpu_bundle.missing_here(wheels) == [wheels[1]]  # numpy is installed here, so it is kept


def test_torchvision_is_the_one_built_for_the_torch_given():
    assert gpu_bundle.torchvision_for("2.11") == "torchvision==0.26.*"
    assert gpu_bundle.torchvision_for("2.14.1") == "torchvision==0.29.*"
    with pytest.raises(SystemExit, match="only torch 2.x"):
        gpu_bundle.torchvision_for("3.0")
