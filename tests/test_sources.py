"""Dataset sources: write small files in each dataset's real format, read them back, compare exactly."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sources import DataError, cifar, class_groups, load_source, longtail_counts

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- long-tail arithmetic

def test_longtail_counts_ten_classes():
    assert longtail_counts(10, 500, 100).tolist() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]


@pytest.mark.parametrize("imbalance, total", [(100, 10847), (50, 12608), (10, 19573)])
def test_cifar100_lt_sizes(imbalance, total):
    counts = longtail_counts(100, 500, imbalance)
    assert counts.sum() == total  # the CIFAR-100-LT sizes reported by LDAM and later papers
    assert counts[0] == 500 and counts[-1] == 500 // imbalance


def test_groups_of_fmnist_lt_counts():
    groups = class_groups(longtail_counts(10, 500, 100))
    assert {name: int(mask.sum()) for name, mask in groups.items()} == {"many": 4, "medium": 3, "few": 3}


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(DataError) as error:
        load_source("cifar10-lt")
    for known in ("fmnist-lt", "cifar100-lt", "imagenet-lt", "inat2018"):
        assert known in str(error.value)


# ---------------------------------------------------------------- CIFAR-100-LT

def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def write_cifar(folder: Path, per_class: int, test_size: int = 20, seed: int = 0) -> dict:
    """Real-format cifar-100-python pickles; returns the raw CHW rows and labels that were written."""
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.repeat(np.arange(100), per_class))
    train_data = rng.integers(0, 256, (len(train_labels), 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 100, test_size)
    test_data = rng.integers(0, 256, (test_size, 3072), dtype=np.uint8)
    for name, data, labels in (("train", train_data, train_labels), ("test", test_data, test_labels)):
        write_pickle(folder / name, {b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
                                     b"fine_labels": labels.tolist(), b"coarse_labels": [0] * len(labels),
                                     b"data": data})
    write_pickle(folder / "meta", {b"fine_label_names": [b"class%02d" % c for c in range(100)]})
    return {"train_data": train_data, "train_labels": train_labels,
            "test_data": test_data, "test_labels": test_labels}


def chw_to_hwc(rows: np.ndarray) -> np.ndarray:
    """Independent of the reader: pixel (y, x) of channel c is byte c*1024 + y*32 + x."""
    out = np.empty((len(rows), 32, 32, 3), dtype=np.uint8)
    for c in range(3):
        for y in range(32):
            out[:, y, :, c] = rows[:, c * 1024 + y * 32: c * 1024 + y * 32 + 32]
    return out


@pytest.fixture
def small_cifar(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "N_MAX", 6)  # 100 classes x 6 images keeps the files small
    written = write_cifar(tmp_path / "cifar-100-python", per_class=6)
    return tmp_path, written


def ldam_split(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The LDAM / BBN code's choice, written as that code does it: np.random.seed(0), then for each class in
    class order np.random.shuffle of its indices and the first n_c kept."""
    np.random.seed(0)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        keep.append(idx[:n])
    return np.sort(np.concatenate(keep))


@pytest.mark.parametrize("imbalance", [10, 50, 100])
def test_cifar_long_tail_keeps_the_images_of_the_standard_split(small_cifar, imbalance):
    root, written = small_cifar
    source = load_source("cifar100-lt", root, imbalance)
    counts = longtail_counts(100, 6, imbalance)
    labels = written["train_labels"]
    expected_ids = ldam_split(labels, counts)
    first = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)]))
    assert not np.array_equal(expected_ids, first)  # the shuffle matters: not the first n_c of each class
    assert source.num_classes == 100
    assert source.class_counts.tolist() == counts.tolist()
    assert np.array_equal(source.train.ids, expected_ids)
    assert np.array_equal(source.train.labels, labels[expected_ids])
    assert np.array_equal(source.train.images, chw_to_hwc(written["train_data"][expected_ids]))
    assert source.info["imbalance"] == imbalance


def test_cifar_test_split_names_and_statistics(small_cifar):
    root, written = small_cifar
    source = load_source("cifar100-lt", root, 100)
    assert np.array_equal(source.test.ids, np.arange(20))
    assert np.array_equal(source.test.labels, written["test_labels"])
    assert np.array_equal(source.test.images, chw_to_hwc(written["test_data"]))
    assert source.test.images.dtype == np.uint8 and source.test.images.shape == (20, 32, 32, 3)
    assert source.class_names[0] == "class00" and source.class_names[99] == "class99"
    assert source.mean == (0.5071, 0.4865, 0.4409) and source.std == (0.2673, 0.2564, 0.2762)


def test_cifar_pixels_land_in_hwc(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "N_MAX", 1)
    write_cifar(tmp_path, per_class=1)  # root is the cifar-100-python folder itself
    pattern = np.zeros(3072, dtype=np.uint8)
    pattern[0 * 1024 + 5 * 32 + 7] = 11  # red at row 5, column 7
    pattern[1 * 1024 + 0 * 32 + 31] = 22  # green at row 0, column 31
    pattern[2 * 1024 + 31 * 32 + 0] = 33  # blue at row 31, column 0
    write_pickle(tmp_path / "test", {b"fine_labels": [4], b"data": pattern[None]})
    image = load_source("cifar100-lt", tmp_path, 1).test.images[0]
    assert (image[5, 7, 0], image[0, 31, 1], image[31, 0, 2]) == (11, 22, 33)
    assert int(image.sum()) == 11 + 22 + 33


# What the real cifar-100-python files hold: Python 2 pickles (protocol 2, py2 str as SHORT_BINSTRING)
# naming numpy.core.multiarray, here {'data': uint8 array [[97, 98, 99]]}, written opcode by opcode.
PYTHON2_ARRAY_PICKLE = (
    b"\x80\x02}q\x00U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
    b"K\x00\x85U\x01b\x87Rq\x04(K\x01K\x01K\x03\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06"
    b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x03abctbs.")


def test_cifar_reads_python2_numpy_pickles(tmp_path):
    path = tmp_path / "train"
    path.write_bytes(PYTHON2_ARRAY_PICKLE)
    data = cifar.read_pickle(path)
    assert list(data) == [b"data"] and data[b"data"].dtype == np.uint8
    assert data[b"data"].tolist() == [[97, 98, 99]]


class RunsCommand:
    """Pickles to a call of os.system, the classic malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_pickle_with_forbidden_global_is_refused(small_cifar):
    root, _ = small_cifar
    marker = root / "pwned"
    train = root / "cifar-100-python" / "train"
    write_pickle(train, {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [RunsCommand(marker)]})
    with pytest.raises(DataError) as error:
        load_source("cifar100-lt", root, 100)
    assert str(train) in str(error.value) and "system" in str(error.value)
    assert not marker.exists()


def test_cifar_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="does not exist.*cifar-100-python.tar.gz"):
        load_source("cifar100-lt", tmp_path / "nowhere", 100)
    with pytest.raises(DataError, match=r"cifar-100-python/train is missing.*cifar-100-python.tar.gz"):
        load_source("cifar100-lt", tmp_path, 100)


def test_cifar_too_few_images_names_the_file(small_cifar, monkeypatch):
    root, _ = small_cifar
    monkeypatch.setattr(cifar, "N_MAX", 7)
    with pytest.raises(DataError, match="cifar-100-python/train: class 0 of train has 6 images"):
        load_source("cifar100-lt", root, 100)


def test_cifar_malformed_pickles_name_the_file(small_cifar):
    root, _ = small_cifar
    train = root / "cifar-100-python" / "train"
    write_pickle(train, {b"data": np.zeros((2, 3000), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(DataError, match=f"{train}: b'data' must be a uint8 array of shape"):
        load_source("cifar100-lt", root, 100)
    write_pickle(train, {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DataError, match=f"{train}: key b'fine_labels' is missing"):
        load_source("cifar100-lt", root, 100)
    train.write_bytes(pickle.dumps({b"data": 1})[:-5])
    with pytest.raises(DataError, match=f"{train}: cannot unpickle"):
        load_source("cifar100-lt", root, 100)


# ---------------------------------------------------------------- ImageNet-LT

def write_jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path, "JPEG")


def write_imagenet_lt(root: Path, lists_in: Path) -> dict:
    """Class 0: 120 train images (Many), class 1: 30 (Medium), class 2: 5 (Few); 4 test images."""
    splits = {"train": [(c, i) for c, n in ((0, 120), (1, 30), (2, 5)) for i in range(n)],
              "val": [(1, 0), (2, 0)], "test": [(2, 0), (0, 0), (999, 0), (1, 0)]}
    listed = {}
    lists_in.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        rels = [f"{split}/n{c:08d}/n{c:08d}_{i}.JPEG" for c, i in items]
        for rel, (c, i) in zip(rels, items, strict=True):
            write_jpeg(root / rel, (c + i) % 256)
        text = "".join(f"{rel} {c}\n" for rel, (c, _) in zip(rels, items, strict=True))
        (lists_in / f"ImageNet_LT_{split}.txt").write_text(text)
        listed[split] = (rels, [c for c, _ in items])
    return listed


@pytest.mark.parametrize("subfolder", ["", "ImageNet_LT"])
def test_imagenet_lt_reads_split_files(tmp_path, subfolder):
    listed = write_imagenet_lt(tmp_path, tmp_path / subfolder)
    source = load_source("imagenet-lt", tmp_path, 10)
    for split in (source.train, source.test):
        rels, labels = listed[split.name]
        assert split.files == tuple(str(tmp_path.absolute() / rel) for rel in rels)
        assert split.labels.tolist() == labels
        assert split.ids.tolist() == list(range(len(rels)))
    assert source.num_classes == 1000 and not source.train.in_memory
    assert source.class_counts[:4].tolist() == [120, 30, 5, 0] and source.class_counts.sum() == 155
    assert {k: int(v.sum()) for k, v in source.groups().items()} == {"many": 1, "medium": 1, "few": 998}
    assert source.mean == (0.485, 0.456, 0.406) and source.std == (0.229, 0.224, 0.225)
    assert source.info["val_list"] == str(tmp_path / subfolder / "ImageNet_LT_val.txt")


def test_imagenet_lt_ignores_imbalance_and_blank_lines(tmp_path):
    write_imagenet_lt(tmp_path, tmp_path)
    listing = tmp_path / "ImageNet_LT_test.txt"
    listing.write_text("\n" + listing.read_text().replace("\n", "\n  \n"))
    a, b = load_source("imagenet-lt", tmp_path, 10), load_source("imagenet-lt", tmp_path, 100)
    assert a.fingerprint() == b.fingerprint() and "imbalance" not in a.info
    assert len(a.test) == 4


@pytest.mark.parametrize("line, problem", [
    ("test/a.JPEG 3 extra", "expected 2 fields"),
    ("test/a.JPEG", "expected 2 fields"),
    ("test/a.JPEG three", "label 'three' is not an integer"),
    ("test/a.JPEG 1000", "label 1000 is outside 0..999"),
    ("test/a.JPEG -1", "label -1 is outside 0..999"),
])
def test_imagenet_lt_malformed_line_names_file_and_line(tmp_path, line, problem):
    write_imagenet_lt(tmp_path, tmp_path)
    listing = tmp_path / "ImageNet_LT_test.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(lines[:2] + ["", line] + lines[2:]) + "\n")
    with pytest.raises(DataError) as error:
        load_source("imagenet-lt", tmp_path, 100)
    message = str(error.value)
    assert f"{listing}, line 4: {problem}" in message and repr(line) in message


def test_imagenet_lt_missing_root_and_lists_say_how(tmp_path):
    with pytest.raises(DataError, match="does not exist.*ImageNet_LT_train.txt"):
        load_source("imagenet-lt", tmp_path / "nowhere", 100)
    with pytest.raises(DataError, match="ImageNet_LT_train.txt is in neither .*DATA_ROOT"):
        load_source("imagenet-lt", tmp_path, 100)


def test_imagenet_lt_wrong_image_root_names_first_file(tmp_path):
    listed = write_imagenet_lt(tmp_path / "images", tmp_path / "lists")
    with pytest.raises(DataError) as error:
        load_source("imagenet-lt", tmp_path / "lists", 100)
    first = tmp_path.absolute() / "lists" / listed["train"][0][0]
    assert f"{first} (first image listed in" in str(error.value) and "image root" in str(error.value)


# ---------------------------------------------------------------- iNaturalist 2018

def write_inat(root: Path, category_ids=(0, 1, 2)) -> dict:
    """COCO-style files whose images, annotations and categories are each listed in a different order."""
    docs = {}
    plan = {"train2018.json": [0, 0, 1, 2, 0, 1, 2, 2], "val2018.json": [2, 1, 0]}
    for name, classes in plan.items():
        ids = [100 + 7 * i for i in range(len(classes))][::-1]  # ids are not positions
        images = [{"id": ids[i], "file_name": f"train_val2018/Plantae/{category_ids[c]}/{name[:3]}{i}.jpg",
                   "width": 4, "height": 4} for i, c in enumerate(classes)]
        annotations = [{"id": k, "image_id": ids[i], "category_id": category_ids[classes[i]]}
                       for k, i in enumerate(reversed(range(len(classes))))]
        categories = [{"id": cid, "name": f"species {cid}"} for cid in reversed(category_ids)]
        docs[name] = {"images": images, "annotations": annotations, "categories": categories}
        (root / name).write_text(json.dumps(docs[name]))
        for i, image in enumerate(images):
            write_jpeg(root / image["file_name"], i)
    return docs


def test_inat_reads_images_in_file_order(tmp_path):
    docs = write_inat(tmp_path)
    source = load_source("inat2018", tmp_path, 100)
    assert source.num_classes == 3 and source.class_names == ("species 0", "species 1", "species 2")
    assert source.train.labels.tolist() == [0, 0, 1, 2, 0, 1, 2, 2]
    assert source.test.labels.tolist() == [2, 1, 0]
    assert source.train.ids.tolist() == list(range(8))
    assert source.train.files == tuple(str(tmp_path.absolute() / im["file_name"])
                                       for im in docs["train2018.json"]["images"])
    assert source.class_counts.tolist() == [3, 2, 3]
    assert source.info["category_ids"] == "0..K-1 as in the file"


def test_inat_remaps_sparse_category_ids(tmp_path):
    write_inat(tmp_path, category_ids=(5, 17, 3))
    source = load_source("inat2018", tmp_path, 100)
    # sorted ids 3, 5, 17 become classes 0, 1, 2; the plan's classes 0, 1, 2 were ids 5, 17, 3
    assert source.train.labels.tolist() == [1, 1, 2, 0, 1, 2, 0, 0]
    assert source.class_names == ("species 3", "species 5", "species 17")
    assert "remapped" in source.info["category_ids"] and source.info["original_category_ids"] == [3, 5, 17]


def test_inat_invalid_json_names_file_and_position(tmp_path):
    write_inat(tmp_path)
    (tmp_path / "val2018.json").write_text('{"images": [\n  {"id": 1,, }]}')
    with pytest.raises(DataError, match=f"{tmp_path / 'val2018.json'}: invalid JSON at line 2, column 12"):
        load_source("inat2018", tmp_path, 100)


def rewrite(root: Path, name: str, change) -> Path:
    path = root / name
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.pop("annotations"), "the file has no key 'annotations'"),
    (lambda d: d["images"][1].pop("file_name"), "images[1] has no key 'file_name'"),
    (lambda d: d["images"][2].update(id="x"), "images[2].id must be int, found str"),
    (lambda d: d.update(categories={}), "the file.categories must be list, found dict"),
    (lambda d: d["annotations"][3].update(image_id=999), "annotations[3].image_id 999 is not an id"),
    (lambda d: d["annotations"][0].update(category_id=9), "annotations[0].category_id 9 is not a category"),
    (lambda d: d["annotations"].pop(), "images[0] has no annotation"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0])), "annotations[8] labels image"),
])
def test_inat_malformed_entries_name_file_and_key(tmp_path, change, expected):
    write_inat(tmp_path)
    path = rewrite(tmp_path, "train2018.json", change)
    with pytest.raises(DataError) as error:
        load_source("inat2018", tmp_path, 100)
    assert str(error.value).startswith(f"{path}: {expected}")


def test_inat_missing_image_names_it(tmp_path):
    docs = write_inat(tmp_path)
    first = tmp_path / docs["val2018.json"]["images"][0]["file_name"]
    first.unlink()
    with pytest.raises(DataError, match=f"{first} \\(images\\[0\\].file_name in .*val2018.json\\) does not"):
        load_source("inat2018", tmp_path, 100)


def test_inat_missing_root_says_how(tmp_path):
    with pytest.raises(DataError, match="does not exist.*train2018.json"):
        load_source("inat2018", tmp_path / "nowhere", 100)
    with pytest.raises(DataError, match="train2018.json is missing"):
        load_source("inat2018", tmp_path, 100)


# ---------------------------------------------------------------- Fashion-MNIST-LT

needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason=f"real Fashion-MNIST not installed at {FMNIST} "
                                         "(apt-get install dataset-fashion-mnist)")


def raw_idx(name: str) -> np.ndarray:
    """Independent IDX read: skip the magic and dimension words, keep the bytes."""
    with gzip.open(FMNIST / name, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim:], np.uint8).reshape(shape)


@pytest.fixture(scope="module")
def fmnist_raw():
    return raw_idx("train-images-idx3-ubyte.gz"), raw_idx("train-labels-idx1-ubyte.gz")


@needs_fmnist
@pytest.mark.parametrize("imbalance", [10, 50, 100])
def test_fmnist_lt_real_data(fmnist_raw, imbalance):
    images, labels = fmnist_raw
    source = load_source("fmnist-lt", None, imbalance)
    assert source.class_counts.tolist() == longtail_counts(10, 500, imbalance).tolist()
    assert np.array_equal(source.train.labels, labels[source.train.ids])
    kept = source.train.images
    assert kept.shape == (len(source.train), 32, 32, 1) and kept.dtype == np.uint8
    assert np.array_equal(kept[:, 2:30, 2:30, 0], images[source.train.ids])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not kept[:, border].any()
    assert len(source.test) == 10000 and source.test.images.shape == (10000, 32, 32, 1)
    if imbalance == 100:
        assert source.class_counts.tolist() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]


def test_fmnist_truncated_idx_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = struct.pack(">HBBIII", 0, 0x08, 3, 10, 28, 28)
    with gzip.open(path, "wb") as handle:
        handle.write(header + bytes(28 * 28 * 3))
    with pytest.raises(DataError, match=f"{path}: header says shape \\(10, 28, 28\\)"):
        load_source("fmnist-lt", tmp_path, 100)
    path.write_bytes(gzip.compress(header + bytes(100))[:-12])  # cut mid-stream
    with pytest.raises(DataError, match=f"{path}: cannot read IDX file"):
        load_source("fmnist-lt", tmp_path, 100)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=f"{path}: cannot read IDX file"):
        load_source("fmnist-lt", tmp_path, 100)
