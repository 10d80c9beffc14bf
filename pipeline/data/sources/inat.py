"""iNaturalist 2018 (Van Horn et al.): COCO-style train2018.json / val2018.json over the image folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import DataError, Source, Split, require_dir, require_file

DEFAULT_ROOT = Path("data/inat2018")
HOW = ("Download the iNaturalist 2018 images (train_val2018.tar.gz) and annotations (train2018.json, "
       "val2018.json) from github.com/visipedia/inat_comp/tree/master/2018 and set DATA_ROOT= to the folder "
       "that holds both JSON files and the train_val2018/ image folder.")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; invalid JSON is an error naming the file and position."""
    try:
        with open(path, "rb") as handle:
            doc = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno} "
                        f"(character {error.pos}): {error.msg}. Download the file again. {HOW}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({error}). {HOW}") from error
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object at the top, found {type(doc).__name__}")
    return doc


def field(entry: object, key: str, kind: type, path: Path, where: str):
    """``entry[key]``, checked to be a ``kind``; errors name the file and the entry (``images[3].id``)."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where} must be an object, found {type(entry).__name__}")
    if key not in entry:
        raise DataError(f"{path}: {where} has no key {key!r}. Is this a COCO-style iNaturalist file? {HOW}")
    value = entry[key]
    # bool is an int subclass, but true/false is never a valid id
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{path}: {where}.{key} must be {kind.__name__}, found {type(value).__name__} "
                        f"({value!r:.60})")
    return value


def category_map(doc: dict, path: Path) -> tuple[dict[int, int], tuple[str, ...], dict]:
    """Category id -> class index 0..K-1, class names, and info saying whether ids were remapped."""
    categories = field(doc, "categories", list, path, "the file")
    ids, names = [], {}
    for i, entry in enumerate(categories):
        cid = field(entry, "id", int, path, f"categories[{i}]")
        if cid in names:
            raise DataError(f"{path}: categories[{i}].id {cid} appears twice")
        ids.append(cid)
        names[cid] = str(entry.get("name", cid))
    if not ids:
        raise DataError(f"{path}: 'categories' is empty. {HOW}")
    ordered = sorted(ids)
    mapping = {cid: k for k, cid in enumerate(ordered)}
    if ordered == list(range(len(ordered))):
        info = {"category_ids": "0..K-1 as in the file"}
    else:  # keep the original ids so results can be traced back to iNaturalist's categories
        info = {"category_ids": "remapped: sorted category ids -> 0..K-1", "original_category_ids": ordered}
    return mapping, tuple(names[cid] for cid in ordered), info


def image_table(doc: dict, path: Path) -> tuple[list[str], dict[int, int]]:
    """File names in file order, and image id -> position."""
    images = field(doc, "images", list, path, "the file")
    files, position = [], {}
    for i, entry in enumerate(images):
        image_id = field(entry, "id", int, path, f"images[{i}]")
        if image_id in position:
            raise DataError(f"{path}: images[{i}].id {image_id} repeats images[{position[image_id]}].id")
        position[image_id] = i
        files.append(field(entry, "file_name", str, path, f"images[{i}]"))
    if not files:
        raise DataError(f"{path}: 'images' is empty. {HOW}")
    return files, position


def image_labels(doc: dict, path: Path, position: dict[int, int], mapping: dict[int, int]) -> np.ndarray:
    """Class index of every image; each image must have exactly one annotation."""
    labels = np.full(len(position), -1, dtype=np.int64)
    for i, entry in enumerate(field(doc, "annotations", list, path, "the file")):
        image_id = field(entry, "image_id", int, path, f"annotations[{i}]")
        category = field(entry, "category_id", int, path, f"annotations[{i}]")
        if image_id not in position:
            raise DataError(f"{path}: annotations[{i}].image_id {image_id} is not an id in 'images'")
        if category not in mapping:
            raise DataError(f"{path}: annotations[{i}].category_id {category} is not a category of the "
                            f"training file")
        if labels[position[image_id]] >= 0:
            raise DataError(f"{path}: annotations[{i}] labels image {image_id} a second time")
        labels[position[image_id]] = mapping[category]
    unlabelled = np.flatnonzero(labels < 0)
    if len(unlabelled):
        raise DataError(f"{path}: images[{unlabelled[0]}] has no annotation "
                        f"({len(unlabelled)} images have none)")
    return labels


def read_split(root: Path, doc: dict, path: Path, name: str, mapping: dict[int, int]) -> Split:
    """One COCO-style file as a file-backed split, in the order of its ``images`` list."""
    files, position = image_table(doc, path)
    labels = image_labels(doc, path, position, mapping)
    split = Split(name=name, labels=labels, ids=np.arange(len(files), dtype=np.int64),
                  files=tuple(str(root / f) for f in files), root=str(root))
    first = Path(split.files[0])
    if not first.is_file():  # checking all 400k files is too slow; a wrong root shows on the first
        raise DataError(f"{first} (images[0].file_name in {path}) does not exist; is {root} the folder "
                        f"the file names are relative to? {HOW}")
    return split


def load(root: Path | None = None, imbalance: float = 100) -> Source:
    """iNaturalist 2018: train from train2018.json, test from val2018.json, images under ``root``.

    ``imbalance`` is ignored; the dataset's own long tail is used.
    """
    del imbalance
    root = require_dir(Path(root) if root else DEFAULT_ROOT, "inat2018", HOW).absolute()
    train_path = require_file(root / "train2018.json", "inat2018", HOW)
    test_path = require_file(root / "val2018.json", "inat2018", HOW)
    train_doc = read_json(train_path)
    mapping, names, info = category_map(train_doc, train_path)
    train = read_split(root, train_doc, train_path, "train", mapping)
    del train_doc  # the real file is a few hundred MB once parsed
    test = read_split(root, read_json(test_path), test_path, "test", mapping)
    return Source(name="inat2018", num_classes=len(mapping), train=train, test=test, class_names=names,
                  mean=MEAN, std=STD, info={"root": str(root), **info})
