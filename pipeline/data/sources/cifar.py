"""CIFAR-100-LT: the python-pickle release of CIFAR-100, long-tailed as in Cao et al. (LDAM, 2019), with the
images their code keeps (``SPLIT_SEED``), which the DiVE paper's numbers use."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .base import DataError, Source, Split, longtail_counts, longtail_subset, require_dir, require_file

DEFAULT_ROOT = Path("data/cifar100")
FOLDER = "cifar-100-python"
HOW = ("Download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html on a machine "
       "with network access and extract it under DATA_ROOT, so that DATA_ROOT/cifar-100-python/train exists "
       "(DATA_ROOT may also point at the cifar-100-python folder itself).")
NUM_CLASSES = 100
N_MAX = 500  # images of the largest class; a module constant so tests can shrink the long tail
SPLIT_SEED = 0  # LDAM's IMBALANCECIFAR100(rand_number=0): np.random.seed(0), then a shuffle per class
SIDE = 32
MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def _numpy_reconstructors() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array needs, under the module names numpy 1 and numpy 2 write."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x has no numpy._core
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global is refused before it is resolved.

    A pickle can call any importable function while it loads, so a tampered download could run code.
    Refusing in ``find_class`` stops that before the callable is even looked up.
    """

    ALLOWED = _numpy_reconstructors()

    def __init__(self, handle, path: Path) -> None:
        super().__init__(handle, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refusing to unpickle global {module}.{name}; a CIFAR pickle holds "
                            f"only dicts, lists and numpy arrays. Download the file again. {HOW}") from None


def read_pickle(path: Path) -> dict:
    """Load one CIFAR pickle (a dict with bytes keys) without running code from the file."""
    try:
        with open(path, "rb") as handle:
            data = _ArrayOnlyUnpickler(handle, path).load()
    except DataError:
        raise
    except Exception as error:  # unpickling a damaged file can raise almost anything
        raise DataError(f"{path}: cannot unpickle ({type(error).__name__}: {error}). "
                        f"Download the file again. {HOW}") from error
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a dict, found {type(data).__name__}. {HOW}")
    return data


def _key(data: dict, key: bytes, path: Path):
    if key not in data:
        found = ", ".join(repr(k) for k in data)
        raise DataError(f"{path}: key {key!r} is missing (found {found}). Is this the CIFAR-100 file? {HOW}")
    return data[key]


def _images(data: dict, path: Path) -> np.ndarray:
    """``b'data'`` rows are 3072 bytes in channel-major (CHW) order; return uint8 HWC [N, 32, 32, 3]."""
    raw = _key(data, b"data", path)
    wanted = f"{path}: b'data' must be a uint8 array of shape [N, 3072]"
    if not isinstance(raw, np.ndarray):
        raise DataError(f"{wanted}, found {type(raw).__name__}")
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3 * SIDE ** 2:
        raise DataError(f"{wanted}, found {raw.dtype} array of shape {raw.shape}")
    return np.ascontiguousarray(raw.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1))


def _labels(data: dict, path: Path, n: int) -> np.ndarray:
    raw = _key(data, b"fine_labels", path)
    try:
        labels = np.asarray(raw, dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: b'fine_labels' must be a list of integers ({error})") from error
    if labels.shape != (n,):
        raise DataError(f"{path}: {n} images but b'fine_labels' has shape {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: b'fine_labels' range {labels.min()}..{labels.max()}, expected 0..99")
    return labels


def read_split(path: Path, name: str) -> Split:
    """One CIFAR-100 pickle (``train`` or ``test``) as an in-memory split, in file order."""
    data = read_pickle(path)
    images = _images(data, path)
    labels = _labels(data, path, len(images))
    return Split(name=name, labels=labels, ids=np.arange(len(labels), dtype=np.int64), images=images)


def read_class_names(path: Path) -> tuple[str, ...]:
    """The 100 fine label names from the ``meta`` pickle."""
    names = _key(read_pickle(path), b"fine_label_names", path)
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise DataError(f"{path}: b'fine_label_names' must be a list of {NUM_CLASSES} names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def find_folder(root: Path) -> Path:
    """``root/cifar-100-python`` if it exists, else ``root`` itself when it holds the pickles."""
    nested = root / FOLDER
    if nested.is_dir() or not (root / "train").is_file():
        return nested
    return root


def load(root: Path | None = None, imbalance: float = 100) -> Source:
    """CIFAR-100-LT: class c keeps floor(500 * (1/IF)^(c/99)) training images, chosen as LDAM's code chooses them
    (see ``longtail_subset``); the full test set."""
    root = require_dir(Path(root) if root else DEFAULT_ROOT, "cifar100-lt", HOW)
    folder = find_folder(root)
    paths = {part: require_file(folder / part, "cifar100-lt", HOW) for part in ("train", "test", "meta")}
    train = read_split(paths["train"], "train")
    counts = longtail_counts(NUM_CLASSES, N_MAX, imbalance)
    try:
        train = longtail_subset(train, counts, shuffle_seed=SPLIT_SEED)
    except DataError as error:  # base's message names the class, not the file it came from
        raise DataError(f"{paths['train']}: {error}. Is this the full CIFAR-100 training file?") from error
    return Source(
        name="cifar100-lt", num_classes=NUM_CLASSES, train=train,
        test=read_split(paths["test"], "test"), class_names=read_class_names(paths["meta"]),
        mean=MEAN, std=STD, info={"imbalance": imbalance, "root": str(folder)},
    )
