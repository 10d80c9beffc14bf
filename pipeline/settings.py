"""Per-stage settings: one typed, frozen dataclass per stage, with the paper's defaults for each dataset.

Each stage accepts only its own keys. A key of another stage is an error that names the stage owning it and
the Make variable to use, so a student setting can never reach (and retrain) a teacher. A stage's settings
split into identity (what the run computes) and runtime (how: decode threads, bf16, channels_last, the
dump's batch); only identity names a run folder and is compared when a run resumes.

This module (and ``pipeline.run_names``, which names run folders from these settings) imports the standard
library only, so Make can resolve run folders with the system Python before any virtual environment exists
(``python3 -m stages.paths``).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, fields, replace
from typing import ClassVar

LOSSES = ("bsce", "ce")
CODECS = ("float16", "int8", "topk", "sampled")  # store.codecs.CODECS
SPARSE = ("topk", "sampled")  # store.codecs.SPARSE: the codecs that take topk=K
TOPK = 20  # K of codec=topk: 4K + 20 = 100 bytes a view, 0.1 byte a logit at C = 1000 (codec=sampled: 8K + 20)
SCHEDULES = ("step", "cosine")
MODES = ("cached", "online")
AUG_KINDS = ("pad_crop", "resized_crop", "short_side_crop", "identity")  # pipeline.data.views.KINDS
RUNTIME_KEYS = ("workers", "prefetch", "bf16", "channels_last", "eval_every", "micro_batch")
PREFETCH = 2  # batches a background thread makes ahead of the step (pipeline.data.loaders.PREFETCH)
WARMUPS = ("epoch", "step")
TEACHER_EXPERTS = 6  # a RIDE teacher's experts unless experts= says otherwise
STUDENT_EXPERTS = 4  # a RIDE-DiVE student's
RIDE_STUDENT_ALPHA = 0.75  # RIDE-DiVE's alpha (DiVE paper, multi-expert students)
RIDE_STUDENT_TAU = {"imagenet-lt": 3.0}  # and its tau where it differs from the single-model student's


class ConfigError(ValueError):
    """An unknown or misplaced key, or a value that does not parse as the key's type or is out of range."""


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _at_least(settings, low: int, *names: str) -> None:
    for name in names:
        if getattr(settings, name) < low:
            raise ConfigError(f"{name} must be at least {low}, got {getattr(settings, name)}")


class _Keys:
    """Identity and runtime views of a settings dataclass; ``runtime_keys`` names the runtime fields."""

    runtime_keys: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))

    def identity(self) -> dict:
        """The settings that say what the run computes: everything but the runtime keys."""
        return {k: v for k, v in self.to_dict().items() if k not in self.runtime_keys}

    def runtime(self) -> dict:
        """How the run computes it (recorded beside the outputs, never compared)."""
        return {k: v for k, v in self.to_dict().items() if k in self.runtime_keys}


@dataclass(frozen=True, kw_only=True)
class Training(_Keys):
    """What teacher and student training share: the model and the optimisation recipe, plus runtime keys."""

    model: str
    experts: int = 0  # experts of a RIDE model (model=ride); 0: the stage's default
    epochs: int
    batch_size: int  # the global batch, over all processes
    lr: float
    momentum: float = 0.9
    weight_decay: float
    schedule: str  # "step" (milestones x gamma) or "cosine" (by epoch)
    warmup_epochs: int
    # "epoch": lr * (e + 1) / W in epoch e < W (LDAM's CIFAR schedule); "step": Goyal et al.'s gradual warm-up,
    # rising linearly every iteration from lr / steps to lr over the first W epochs
    warmup: str = "epoch"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.01
    seed: int = 0
    # runtime: recorded, never part of a run's identity
    eval_every: int = 0  # also evaluate every k epochs (0: only at the end)
    # Images per forward/backward pass on a device; gradients accumulate over a rank's share of the global
    # batch, so batch, lr and schedule hold on any number of devices. 0 ("auto"): the largest that fits,
    # measured by a probe step before training.
    micro_batch: int = 0
    workers: int = 2  # DALI decode threads for image-file datasets
    prefetch: int = PREFETCH  # batches made ahead by a background thread while the step runs (0: none)
    bf16: bool = True  # bfloat16 autocast
    channels_last: bool = True

    runtime_keys: ClassVar[tuple[str, ...]] = RUNTIME_KEYS

    def __post_init__(self) -> None:
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("warmup", self.warmup, WARMUPS)
        _at_least(self, 1, "epochs", "batch_size")
        _at_least(self, 0, "experts", "warmup_epochs", "seed", "eval_every", "workers", "prefetch", "micro_batch")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")

    @property
    def is_ride(self) -> bool:
        return self.model.startswith("ride_")


@dataclass(frozen=True, kw_only=True)
class TeacherSettings(Training):
    """The teacher stage: the dataset split, the loss, and the training views (which the cache records)."""

    dataset: str
    imbalance: float = 100.0  # long-tail imbalance factor for fmnist-lt, cifar100-lt and glyph-lt
    classes: int = 0  # glyph-lt's class count C (0: the dataset's own); the other datasets have fixed classes
    loss: str = "bsce"
    diversity: float = -0.2  # weight of RIDE's diversity term for a RIDE teacher (negative: experts differ)
    aug: str  # see pipeline.data.views.ViewSpec
    crop_size: int
    pad: int = 4
    resize: int = 256
    jitter: float = 0.0
    flip: bool = True  # random horizontal flips (not for characters: a mirrored glyph is another shape)

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("loss", self.loss, LOSSES)
        _one_of("aug", self.aug, AUG_KINDS)
        _at_least(self, 1, "crop_size", "imbalance")
        _at_least(self, 0, "classes")

    def view_spec(self):
        """The training-view definition (``pipeline.data.views.ViewSpec``) that teacher and cache draw from."""
        from pipeline.data.views import ViewSpec  # torch: imported only where views are made

        return ViewSpec(kind=self.aug, size=self.crop_size, pad=self.pad, resize=self.resize, jitter=self.jitter,
                        flip=self.flip)


@dataclass(frozen=True, kw_only=True)
class CacheSettings(_Keys):
    """The cache stage: how many views, their seed, and how logits are stored."""

    views: int  # V, recorded views per training image
    view_seed: int = 1  # seed of the recorded views (the teacher's training views use its own seed)
    codec: str = "float16"
    topk: int = TOPK  # logits kept per view by codec=topk or sampled (ignored, and not in the identity, otherwise)
    expert_logits: bool = False  # also store a RIDE teacher's per-expert logits (expert_logits.zarr)
    # runtime
    batch_size: int  # images per teacher forward pass while dumping; never reaches a student
    workers: int = 2
    prefetch: int = PREFETCH  # view batches made ahead of the teacher (0: none)
    bf16: bool = True
    channels_last: bool = True

    runtime_keys: ClassVar[tuple[str, ...]] = ("batch_size", "workers", "prefetch", "bf16", "channels_last")

    def __post_init__(self) -> None:
        _one_of("codec", self.codec, CODECS)
        _at_least(self, 1, "views", "batch_size", "topk")
        if self.codec in SPARSE and self.expert_logits:
            raise ConfigError(f"codec={self.codec} cannot store per-expert logits (expert_logits=true): each expert's "
                              "softmax needs its own top-K; use codec=float16 or int8 for them")

    def identity(self) -> dict:
        mine = super().identity()
        if self.codec not in SPARSE:  # K means nothing to the dense codecs: it must not rename their caches
            mine.pop("topk")
        return mine

    @property
    def k(self) -> int:
        """The codec's K (0 for the dense codecs)."""
        return self.topk if self.codec in SPARSE else 0
        _at_least(self, 0, "view_seed", "workers", "prefetch")


@dataclass(frozen=True, kw_only=True)
class StudentSettings(Training):
    """The student stage: DiVE's temperature, power and weight, the mode, and (RIDE) the router."""

    tau: float
    power: float
    alpha: float
    mode: str = "cached"  # cached (read the store) or online (the reference: the teacher run live)
    router_epochs: int = 5  # epochs of a RIDE student's router, trained last with the experts frozen
    router_threshold: float = 0.5  # consult the next expert while the router's probability exceeds this

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("mode", self.mode, MODES)
        _at_least(self, 0, "router_epochs")
        if self.tau <= 0 or self.power <= 0 or not 0 <= self.alpha <= 1 or not 0 <= self.router_threshold <= 1:
            raise ConfigError(f"tau and power must be positive, alpha and router_threshold in [0, 1]; got tau "
                              f"{self.tau}, power {self.power}, alpha {self.alpha}, router_threshold "
                              f"{self.router_threshold}")


STAGES = {"teacher": TeacherSettings, "cache": CacheSettings, "student": StudentSettings}


@dataclass(frozen=True)
class Defaults:
    """A dataset's defaults for each stage (the paper's implementation details)."""

    teacher: TeacherSettings
    cache: CacheSettings
    student: StudentSettings

    def of(self, stage: str):
        return getattr(self, stage)


def _defaults(dataset: str, train: dict, views: dict, v: int, distill: dict) -> Defaults:
    return Defaults(teacher=TeacherSettings(dataset=dataset, **train, **views),
                    cache=CacheSettings(views=v, batch_size=train["batch_size"]),
                    student=StudentSettings(**train, **distill))


_CIFAR_TRAIN = dict(model="resnet32", epochs=200, batch_size=128, lr=0.1, weight_decay=2e-4, schedule="step",
                    warmup_epochs=5, milestones=(120, 160), gamma=0.01)
_CIFAR_VIEWS = dict(aug="pad_crop", crop_size=32, pad=4)
_CIFAR_DISTILL = dict(tau=3.0, power=0.5, alpha=0.5)

DATASETS: dict[str, Defaults] = {
    # V = 200 = epochs: one fresh recorded view per student epoch.
    "fmnist-lt": _defaults("fmnist-lt", _CIFAR_TRAIN, _CIFAR_VIEWS, 200, _CIFAR_DISTILL),
    "cifar100-lt": _defaults("cifar100-lt", _CIFAR_TRAIN, _CIFAR_VIEWS, 200, _CIFAR_DISTILL),
    # 300 characters, 9,562 train images (150 down to 1 a class): the CIFAR recipe cut to 40 epochs so that a
    # teacher trains in about 12 minutes on 2 cores; no flips (a mirrored character is another shape).
    "glyph-lt": _defaults("glyph-lt", {**_CIFAR_TRAIN, "epochs": 40, "warmup_epochs": 2, "milestones": (30, 36),
                                       "gamma": 0.1}, {**_CIFAR_VIEWS, "flip": False}, 40, _CIFAR_DISTILL),
    # ResNeXt-50 32x4d; shorter side 256, random 224 crop or its flip, colour jitter; cosine by epoch.
    # The paper states batch 512, lr 0.2 and cosine decay; the 5-epoch gradual warm-up (Goyal et al.) is our
    # choice: without one, short runs diverged within an epoch.
    "imagenet-lt": _defaults("imagenet-lt", dict(model="resnext50_32x4d", epochs=90, batch_size=512, lr=0.2,
                                                 weight_decay=5e-4, schedule="cosine", warmup_epochs=5,
                                                 warmup="step"),
                             dict(aug="short_side_crop", crop_size=224, resize=256, jitter=0.4), 10,
                             dict(tau=9.0, power=1.0, alpha=0.5)),
    # ResNet-50; random resized crop 224 and flip; 90 epochs (200 as an option); cosine; batch 256, lr 0.1 as
    # Goyal et al.'s reference point (the paper's ref. [2]). The 5-epoch gradual warm-up is our choice, as above.
    "inat2018": _defaults("inat2018", dict(model="resnet50", epochs=90, batch_size=256, lr=0.1, weight_decay=5e-4,
                                           schedule="cosine", warmup_epochs=5, warmup="step"),
                          dict(aug="resized_crop", crop_size=224, resize=256), 8, dict(tau=2.0, power=0.5, alpha=0.5)),
}

# The Make variable of each stage's key ("*": the variable for any other key of that stage).
MAKE_VARIABLES = {
    "teacher": {"loss": "LOSS", "seed": "TEACHER_SEED", "epochs": "TEACHER_EPOCHS", "lr": "TEACHER_LR",
                "batch_size": "TEACHER_BATCH", "model": "TEACHER_MODEL", "experts": "TEACHER_EXPERTS",
                "imbalance": "IF", "classes": "CLASSES", "*": "TEACHER_SET"},
    "cache": {"views": "VIEWS", "codec": "CODEC", "*": "CACHE_SET"},
    "student": {"tau": "TAU", "power": "POWER", "alpha": "ALPHA", "mode": "MODE", "seed": "STUDENT_SEED",
                "epochs": "STUDENT_EPOCHS", "lr": "STUDENT_LR", "batch_size": "STUDENT_BATCH",
                "model": "STUDENT_MODEL", "experts": "STUDENT_EXPERTS", "*": "STUDENT_SET"},
}


def make_variable(stage: str, key: str) -> str:
    names = MAKE_VARIABLES[stage]
    return f"{names[key]}=" if key in names else f'{names["*"]}="{key}=..."'


def defaults_for(dataset: str) -> Defaults:
    if dataset not in DATASETS:
        raise ConfigError(f"no settings for dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[dataset]


# --- resolving a stage's settings -------------------------------------------------------------------------


def teacher_settings(dataset: str, overrides: typing.Iterable[str] | dict = ()) -> TeacherSettings:
    """The dataset's teacher defaults with ``key=value`` overrides; ``model=ride`` is the dataset's backbone
    as a RIDE model with 6 experts unless ``experts=`` says otherwise."""
    base = defaults_for(dataset).teacher
    changes = _scaled_lr(base, _changes("teacher", overrides))
    if "dataset" in changes:
        raise ConfigError("the dataset is chosen with DATASET= (make) or --dataset (dive), not an override")
    return _with_experts(_build(base, changes), base.model, TEACHER_EXPERTS)


def cache_settings(dataset: str, overrides: typing.Iterable[str] | dict = ()) -> CacheSettings:
    """The dataset's cache defaults with ``key=value`` overrides."""
    return _build(defaults_for(dataset).cache, _changes("cache", overrides))


def student_settings(dataset: str, overrides: typing.Iterable[str] | dict = ()) -> StudentSettings:
    """The dataset's student defaults with overrides. Nothing comes from the teacher's or the cache's
    settings: a student trains with its own batch, lr and epochs. A RIDE student (model=ride) takes RIDE-DiVE's
    defaults (4 experts, alpha 0.75, tau 3 on ImageNet-LT) where the overrides do not say otherwise."""
    base = defaults_for(dataset).student
    changes = _scaled_lr(base, _changes("student", overrides))
    settings = _with_experts(_build(base, changes), base.model, STUDENT_EXPERTS)
    if settings.is_ride:
        ride = {"alpha": RIDE_STUDENT_ALPHA, "tau": RIDE_STUDENT_TAU.get(dataset, base.tau)}
        settings = _build(settings, {k: v for k, v in ride.items() if k not in changes})
    return settings


RESOLVERS = {"teacher": teacher_settings, "cache": cache_settings, "student": student_settings}


def resolve(stage: str, dataset: str, overrides: typing.Iterable[str] | dict = ()):
    """A stage's resolved settings for ``dataset``."""
    return RESOLVERS[stage](dataset, overrides)


def _with_experts(settings: Training, backbone: str, default_experts: int) -> Training:
    """``model=ride`` as ``ride_<backbone>``, and a RIDE model's expert count resolved (0: the default)."""
    if settings.model == "ride":
        settings = replace(settings, model=f"ride_{backbone}")
    if not settings.is_ride:
        if settings.experts:
            raise ConfigError(f"experts={settings.experts} needs a RIDE model: add model=ride")
        return settings
    return settings if settings.experts else replace(settings, experts=default_experts)


def _scaled_lr(base: Training, changes: dict) -> dict:
    """Goyal et al.'s linear scaling rule: a batch given without an lr takes the defaults' lr times the
    batch's ratio to the defaults' batch, so lr / batch stays as the recipe has it."""
    if "batch_size" in changes and "lr" not in changes:
        changes = {**changes, "lr": base.lr * changes["batch_size"] / base.batch_size}
    return changes


def lr_reason(settings: Training, base: Training) -> str:
    """Why a run uses its lr, for its log: the recipe's, linearly scaled with the batch, or given."""
    if settings.lr == base.lr and settings.batch_size == base.batch_size:
        return f"lr {settings.lr:g}: the recipe's for batch {base.batch_size}"
    scaled = base.lr * settings.batch_size / base.batch_size
    if abs(settings.lr - scaled) <= 1e-12 * scaled:
        return (f"lr {settings.lr:g}: the recipe's {base.lr:g} at batch {base.batch_size}, scaled linearly to batch "
                f"{settings.batch_size} (Goyal et al.; give lr= to choose another)")
    return f"lr {settings.lr:g}: given (the recipe's would be {scaled:g} at batch {settings.batch_size})"


def _build(base, changes: dict):
    try:
        return replace(base, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error


def _changes(stage: str, overrides: typing.Iterable[str] | dict) -> dict:
    if isinstance(overrides, dict):
        unknown = [k for k in overrides if k not in keys_of(stage)]
        if unknown:
            raise ConfigError(_misplaced(stage, unknown[0]))
        return dict(overrides)
    return parse_overrides(stage, overrides)


def keys_of(stage: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(STAGES[stage]))


def parse_overrides(stage: str, overrides: typing.Iterable[str]) -> dict:
    """``key=value`` strings as typed values of ``stage``'s settings. A key of another stage, an unknown key
    or a badly typed value raises a ConfigError that says what to do."""
    types = typing.get_type_hints(STAGES[stage])
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key not in types or key == "runtime_keys":
            raise ConfigError(_misplaced(stage, key))
        changes[key] = parse_value(key, text.strip(), types[key])
    return changes


def _misplaced(stage: str, key: str) -> str:
    owners = [s for s in STAGES if s != stage and key in keys_of(s)]
    if not owners:
        return f"unknown {stage} setting {key!r}; the {stage} stage's keys are: {', '.join(keys_of(stage))}"
    where = " and ".join(f"the {s} stage (set it with {make_variable(s, key)}, or --set {key}=... on "
                         f"`dive {s}`)" for s in owners)
    return f"{key!r} is not a {stage} setting: it belongs to {where}"


def parse_value(key: str, text: str, kind: typing.Any) -> typing.Any:
    """Parse ``text`` as the type ``kind`` of settings key ``key``."""
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if key == "micro_batch" and text.lower() == "auto":
            return 0  # 0 means: measure the largest micro batch that fits
        if kind in (int, float, str):
            return kind(text)
        if typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            return tuple(inner(p) for p in text.replace(",", " ").split() if p)
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    raise ConfigError(f"{key}: unsupported type {kind}")


def from_dict(stage: str, payload: dict):
    """A stage's settings saved with ``to_dict`` (or an older run's flat recipe): the stage's own keys are
    taken, lists become tuples, and a missing key takes its field default."""
    names = set(keys_of(stage))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in payload.items() if k in names}
    try:
        return STAGES[stage](**values)
    except TypeError as error:
        raise ConfigError(f"saved {stage} settings are incomplete: {error}") from error


def jsonable(values: dict) -> dict:
    """Tuples as lists, so a dict compares equal to its own JSON round trip."""
    return json.loads(json.dumps(values))
