"""Typed recipes, one per dataset, taken from the DiVE paper's implementation details.

A recipe is a frozen dataclass. Overrides come as ``key=value`` strings (from the CLI's ``--set`` or
Make's ``SET=``); an unknown key or a value of the wrong type is an error, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields, replace

from .views import ViewSpec

LOSSES = ("bsce", "ce")


class ConfigError(ValueError):
    """An unknown recipe key or a value that does not parse as the key's type."""


@dataclass(frozen=True)
class Recipe:
    """Everything a stage needs to know besides its input and output paths."""

    dataset: str
    model: str
    imbalance: float = 100.0
    # optimisation
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    schedule: str = "step"  # "step" (milestones x gamma) or "cosine" (by epoch)
    warmup_epochs: int = 5
    milestones: tuple[int, ...] = (120, 160)
    gamma: float = 0.01
    # augmentation (see pipeline.views.ViewSpec)
    aug: str = "pad_crop"
    crop_size: int = 32
    pad: int = 4
    resize: int = 256
    jitter: float = 0.0
    # DiVE distillation defaults (student time)
    tau: float = 3.0
    power: float = 0.5
    alpha: float = 0.5
    views: int = 200  # V, teacher views per image in the cache
    view_seed: int = 1  # seed of the cached views (training views use ``seed``)
    codec: str = "float16"  # how the cache stores logits: float16 or int8
    # RIDE multi-expert models (model=ride: the dataset's backbone as a RIDE model)
    experts: int = 0  # experts of a RIDE model; 0: the stage's default (6 for a teacher, 4 for a student)
    diversity: float = -0.2  # weight of RIDE's diversity term for a RIDE teacher (negative: experts differ)
    router_epochs: int = 5  # epochs of the expert-assignment router, trained last with the experts frozen
    router_threshold: float = 0.5  # consult the next expert while the router's probability exceeds this
    expert_logits: bool = False  # cache: also store a RIDE teacher's per-expert logits (expert_logits.zarr)
    # run
    loss: str = "bsce"
    seed: int = 0
    eval_every: int = 0  # evaluate every k epochs as well as at the end (0: only at the end)
    bf16: bool = True  # bfloat16 autocast on CPU (and on GPU)
    channels_last: bool = True
    workers: int = 2  # DALI decode threads for image-file datasets

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.codec not in ("float16", "int8"):
            raise ConfigError(f"codec must be 'float16' or 'int8', got {self.codec!r}")
        if self.schedule not in ("step", "cosine"):
            raise ConfigError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        for name in ("epochs", "batch_size", "crop_size", "views"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.experts < 0 or self.router_epochs < 0 or not 0 <= self.router_threshold <= 1:
            raise ConfigError(f"experts and router_epochs must be >= 0 and router_threshold in [0, 1]; got "
                              f"{self.experts}, {self.router_epochs}, {self.router_threshold}")
        self.view_spec()  # validates aug
        if self.model == "ride":  # the dataset's own backbone, as a RIDE multi-expert model
            base = RECIPES[self.dataset].model if self.dataset in RECIPES else "resnet32"
            object.__setattr__(self, "model", f"ride_{base}")

    @property
    def is_ride(self) -> bool:
        return self.model.startswith("ride_")

    def view_spec(self) -> ViewSpec:
        """The training-view definition this recipe draws from."""
        try:
            return ViewSpec(kind=self.aug, size=self.crop_size, pad=self.pad, resize=self.resize,
                            jitter=self.jitter)
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CIFAR_LIKE = dict(model="resnet32", epochs=200, batch_size=128, lr=0.1, weight_decay=2e-4, schedule="step",
                   warmup_epochs=5, milestones=(120, 160), gamma=0.01, aug="pad_crop", crop_size=32, pad=4,
                   tau=3.0, power=0.5, alpha=0.5, views=200)

RECIPES: dict[str, Recipe] = {
    "fmnist-lt": Recipe(dataset="fmnist-lt", **_CIFAR_LIKE),
    "cifar100-lt": Recipe(dataset="cifar100-lt", **_CIFAR_LIKE),
    # ResNeXt-50 32x4d; shorter side 256, random 224 crop or its flip, colour jitter; cosine by epoch.
    "imagenet-lt": Recipe(dataset="imagenet-lt", model="resnext50_32x4d", epochs=90, batch_size=512, lr=0.2,
                          weight_decay=5e-4, schedule="cosine", warmup_epochs=0, milestones=(), aug="short_side_crop",
                          crop_size=224, resize=256, jitter=0.4, tau=9.0, power=1.0, alpha=0.5, views=10),
    # ResNet-50; random resized crop 224 and flip; 90 epochs (200 as an option); cosine.
    "inat2018": Recipe(dataset="inat2018", model="resnet50", epochs=90, batch_size=256, lr=0.1, weight_decay=5e-4,
                       schedule="cosine", warmup_epochs=0, milestones=(), aug="resized_crop", crop_size=224,
                       resize=256, tau=2.0, power=0.5, alpha=0.5, views=8),
}


def recipe_for(dataset: str, overrides: typing.Iterable[str] = ()) -> Recipe:
    """The dataset's recipe with ``key=value`` overrides applied and type-checked."""
    if dataset not in RECIPES:
        raise ConfigError(f"no recipe for dataset {dataset!r}; known datasets: {', '.join(RECIPES)}")
    return apply_overrides(RECIPES[dataset], overrides)


def apply_overrides(recipe: Recipe, overrides: typing.Iterable[str]) -> Recipe:
    """Apply ``key=value`` strings to a recipe; unknown keys and badly typed values raise ConfigError."""
    return replace(recipe, **parse_overrides(overrides))


def parse_overrides(overrides: typing.Iterable[str]) -> dict:
    """``key=value`` strings as typed recipe values; unknown keys and badly typed values raise ConfigError.
    Values are checked against their recipe's rules when a recipe is built from them."""
    types = typing.get_type_hints(Recipe)
    known = {f.name for f in fields(Recipe)}
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key not in known:
            raise ConfigError(f"unknown recipe key {key!r}; known keys: {', '.join(sorted(known))}")
        if key == "dataset":
            raise ConfigError("the dataset is chosen with DATASET= / --dataset, not an override")
        changes[key] = parse_value(key, text.strip(), types[key])
    return changes


def parse_value(key: str, text: str, kind: typing.Any) -> typing.Any:
    """Parse ``text`` as the type ``kind`` of recipe key ``key``."""
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            parts = [p for p in text.replace(",", " ").split() if p]
            return tuple(inner(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    raise ConfigError(f"{key}: unsupported type {kind}")


def recipe_from_dict(payload: dict) -> Recipe:
    """Rebuild a recipe saved with ``to_dict`` (lists back to tuples); unknown keys are an error."""
    known = {f.name for f in fields(Recipe)}
    unknown = set(payload) - known
    if unknown:
        raise ConfigError(f"unknown recipe keys {sorted(unknown)} in saved config")
    return Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload.items()})
