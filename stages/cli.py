"""The ``dive`` command line: one command per stage, each calling that stage's ``run``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.data.sources import DataError
from pipeline.run_names import cache_dir, student_dir, teacher_dir
from pipeline.settings import ConfigError, resolve
from pipeline.train.errors import RUN_ERRORS
from store.manifest import ArtifactError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DiVE: offline logit-caching distillation for long-tailed recognition.")

DatasetOpt = typer.Option("fmnist-lt", "--dataset", "-d", help="fmnist-lt, cifar100-lt, imagenet-lt or inat2018")
SetOpt = typer.Option(None, "--set", "-s", help="a setting of this stage, key=value (repeatable)")
RootOpt = typer.Option(None, "--data-root", help="dataset folder (default: the dataset's usual place)")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda")
RunsOpt = typer.Option(Path("runs"), "--runs", help="where run folders go (with no --out)")


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _with(overrides: Optional[List[str]], **named) -> list[str]:
    """``--set`` items plus the named options that were given, as key=value strings."""
    return [*(overrides or []), *(f"{k}={v}" for k, v in named.items() if v is not None)]


@app.command()
def teacher(dataset: str = DatasetOpt, loss: Optional[str] = typer.Option(None, help="bsce (default) or ce"),
            seed: Optional[int] = typer.Option(None, help="seed of data order, views and weights (default 0)"),
            overrides: Optional[List[str]] = SetOpt, data_root: Optional[Path] = RootOpt,
            out: Optional[Path] = typer.Option(None, help="run folder (default: from the settings, under --runs)"),
            runs: Path = RunsOpt, device: str = DeviceOpt) -> None:
    """Train a teacher with Balanced Softmax (or the plain CE baseline)."""
    from stages import teacher as stage

    try:
        settings = resolve("teacher", dataset, _with(overrides, loss=loss, seed=seed))
        stage.run(settings, out or teacher_dir(runs, settings), data_root, device)
    except (ConfigError, DataError, ArtifactError, *RUN_ERRORS) as error:
        _fail(error)


@app.command()
def cache(teacher: Optional[Path] = typer.Option(None, help="the teacher's run folder"),
          out: Optional[Path] = typer.Option(None, help="cache folder (default: beside the teacher, named by the "
                                                         "settings)"),
          overrides: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                        help="views=V, view_seed=, codec=float16|int8|topk|sampled, "
                                                             "topk=K, expert_logits=, batch_size= (of the dump) ..."),
          data_root: Optional[Path] = RootOpt, device: str = DeviceOpt,
          plan: bool = typer.Option(False, "--plan", help="print the store's size, layout and per-epoch reads, "
                                                          "and dump nothing (no teacher needed)"),
          dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="with --plan and no --teacher"),
          imbalance: float = typer.Option(100, "--imbalance", help="with --plan and no --teacher: IF"),
          classes: int = typer.Option(0, "--classes", help="with --plan and no --teacher: glyph-lt's C"),
          repair: bool = typer.Option(False, "--repair", help="check every chunk's checksum first and re-dump the "
                                                              "shards holding a damaged one"),
          store_url: Optional[str] = typer.Option(None, "--store-url", help="write the store under this object-store "
                                                                             "prefix (s3://bucket/prefix)")) -> None:
    """Dump the teacher's raw logits for V recorded views of every training image into a Zarr store."""
    from stages import cache as stage
    from stages.artifacts import teacher_of

    try:
        if plan:
            _plan_cache(teacher, dataset, imbalance, classes, overrides)
            return
        if teacher is None:
            raise ConfigError("cache needs --teacher (the teacher's run folder), or --plan to only size a store")
        dataset = teacher_of(teacher).dataset
        settings = resolve("cache", dataset, overrides or [])
        stage.run(teacher, out or cache_dir(teacher, settings, dataset), settings, data_root, device, repair=repair,
                  store_url=store_url)
    except (ConfigError, DataError, ArtifactError) as error:
        _fail(error)


def _plan_cache(teacher: Optional[Path], dataset: Optional[str], imbalance: float, classes: int,
                overrides: Optional[List[str]]) -> None:
    from stages import cache_plan
    from stages.artifacts import teacher_of

    if teacher is not None and (teacher / "config.json").is_file():
        settings = teacher_of(teacher)
        dataset, imbalance, classes = settings.dataset, settings.imbalance, settings.classes
    elif dataset is None:
        raise ConfigError("--plan needs --dataset (or the folder of a teacher that exists, --teacher)")
    cache = resolve("cache", dataset, overrides or [])
    for line in cache_plan.describe(dataset, cache_plan.plan_for(dataset, cache, imbalance, classes)):
        typer.echo(line)


@app.command()
def student(cache_folder: Path = typer.Option(..., "--cache", help="the cache's folder"),
            out: Optional[Path] = typer.Option(None, help="student run folder (default: under the cache, named "
                                                           "by the settings)"),
            tau: Optional[float] = typer.Option(None, help="temperature (default: the dataset's)"),
            power: Optional[float] = typer.Option(None, help="power normalization p (1: none)"),
            alpha: Optional[float] = typer.Option(None, help="weight of the distillation term"),
            seed: Optional[int] = typer.Option(None, help="the student's seed (default 0)"),
            mode: Optional[str] = typer.Option(None, help="cached (default: read the store) or online (run the "
                                                          "teacher)"),
            overrides: Optional[List[str]] = SetOpt, data_root: Optional[Path] = RootOpt,
            device: str = DeviceOpt) -> None:
    """Train a DiVE student from a cache: replayed views, cached soft targets, no teacher."""
    from stages import student as stage

    try:
        dataset = stage.cache_teacher(cache_folder).dataset
        settings = resolve("student", dataset, _with(overrides, tau=tau, power=power, alpha=alpha, seed=seed,
                                                     mode=mode))
        stage.run(cache_folder, out or student_dir(cache_folder, settings, dataset), settings, data_root, device)
    except (ConfigError, DataError, ArtifactError, *RUN_ERRORS) as error:
        _fail(error)


@app.command()
def verify(cache_folder: Path = typer.Option(..., "--cache", help="the cache's folder"),
           replay: int = typer.Option(0, "--replay", help="also run the teacher on this many random (sample, view) "
                                                          "pairs and compare with the stored logits"),
           data_root: Optional[Path] = RootOpt, device: str = DeviceOpt) -> None:
    """Check a cache: completeness, every chunk's checksum, shapes and metadata, fingerprints (PASS or FAIL)."""
    from stages import verify as stage

    try:
        passed = stage.run(cache_folder, replay, data_root, device)
    except (ConfigError, DataError, ArtifactError) as error:
        _fail(error)
    if not passed:
        raise typer.Exit(1)


@app.command()
def report(runs: Path = typer.Option(Path("runs/fmnist-lt"), help="a dataset's run folder"),
           out: Optional[Path] = typer.Option(None, help="Markdown file (default: RUNS/report.md)")) -> None:
    """Write a Markdown table of every teacher and student run (mean and std over seeds)."""
    from stages import report as stage

    try:
        stage.run(runs, out)
    except FileNotFoundError as error:
        _fail(error)


@app.command()
def inspect(cache_dir: Path = typer.Option(..., "--cache", help="the cache's folder"),
            pairs: Optional[List[str]] = typer.Option(None, "--at", help="TAU,P pair (repeatable; default 1,1 3,0.5)"),
            flatness: Optional[float] = typer.Option(None, "--flatness",
                                                     help="find the smallest tau whose min/max reaches this"),
            out: Optional[Path] = typer.Option(None, help="output folder (default: CACHE/inspect)")) -> None:
    """Virtual example distributions of a cache at any tau and p, without running the teacher."""
    from stages import inspect as stage

    try:
        settings = [_pair(text) for text in (pairs or ["1,1", "3,0.5"])]
        stage.run(cache_dir, out or cache_dir / "inspect", settings, flatness)
    except (ConfigError, ArtifactError) as error:
        _fail(error)


def _pair(text: str) -> tuple[float, float]:
    tau, _, power = text.partition(",")
    try:
        values = float(tau), float(power or 1)
    except ValueError:
        raise ConfigError(f"--at {text!r}: expected TAU,P such as 3,0.5") from None
    if values[0] <= 0 or values[1] <= 0:
        raise ConfigError(f"--at {text!r}: tau and p must be positive")
    return values


@app.command("shift-eval")
def shift_eval(runs: Path = typer.Option(Path("runs/fmnist-lt"), help="a dataset's run folder")) -> None:
    """Top-1 of every trained model under test-time label shift (Forward / Backward), without and with PC."""
    from stages import shift_eval as stage

    try:
        stage.run(runs)
    except FileNotFoundError as error:
        _fail(error)


@app.command()
def flatness(out: Path = typer.Option(Path("runs/flatness"), help="output folder"),
             head: int = typer.Option(0, help="head class (Fashion-MNIST 0..9; default 0, T-shirt/top)"),
             tail: int = typer.Option(8, help="tail class (default 8, Bag)"),
             sizes: Optional[List[str]] = typer.Option(None, "--sizes",
                                                       help="HEAD/TAIL training sizes (repeatable; default "
                                                            "5000/500 5000/50 500/50)"),
             eps: Optional[List[float]] = typer.Option(None, "--eps", help="label-smoothing eps of the head "
                                                                              "images (repeatable; default 0 .. 0.4)"),
             runs: int = typer.Option(5, help="runs per point"),
             steps: int = typer.Option(400, help="SGD steps per run"),
             data_root: Optional[Path] = RootOpt) -> None:
    """The two-class experiment (DiVE Appendix A): head and tail accuracy against the virtual ratio R."""
    from pipeline.analysis.flatness import Schedule
    from stages import flatness as stage

    try:
        pairs = [_sizes(text) for text in sizes] if sizes else list(stage.SIZES)
        eps_list = list(eps) if eps else list(stage.EPS)
        bad = [e for e in eps_list if not 0 <= e < 0.5]
        if bad or runs < 1 or steps < 1:
            raise ConfigError(f"--eps must be in [0, 0.5) (got {bad}), --runs and --steps at least 1")
        stage.run(out, head, tail, pairs, eps_list, runs, Schedule(steps=steps), data_root)
    except (ConfigError, DataError, ArtifactError) as error:
        _fail(error)


def _sizes(text: str) -> tuple[int, int]:
    head, _, tail = text.partition("/")
    try:
        pair = int(head), int(tail)
    except ValueError:
        raise ConfigError(f"--sizes {text!r}: expected HEAD/TAIL such as 5000/50") from None
    if min(pair) < 1:
        raise ConfigError(f"--sizes {text!r}: both sizes must be at least 1")
    return pair


ModelOpt = typer.Option(None, "--model", help="METHOD=RUN_FOLDER to choose the CE, BSCE or DiVE run (repeatable; "
                                               "default: the lowest-seed run of each, DiVE at the recipe's settings)")


def _models(items: Optional[List[str]]) -> dict[str, Path]:
    chosen = {}
    for item in items or []:
        method, _, folder = item.partition("=")
        if method not in ("CE", "BSCE", "DiVE") or not folder:
            raise ConfigError(f"--model {item!r}: expected CE=PATH, BSCE=PATH or DiVE=PATH")
        chosen[method] = Path(folder)
    return chosen


@app.command()
def tsne(runs: Path = typer.Option(Path("runs/fmnist-lt"), help="a dataset's run folder"),
         out: Optional[Path] = typer.Option(None, help="output folder (default: RUNS/analysis)"),
         classes: Optional[List[int]] = typer.Option(None, "--classes",
                                                     help="classes to show (repeatable; default one per group)"),
         models: Optional[List[str]] = ModelOpt, data_root: Optional[Path] = RootOpt) -> None:
    """t-SNE of the penultimate-layer test features of CE, BSCE and DiVE (Appendix D)."""
    from stages import analysis

    try:
        analysis.tsne(runs, out or runs / "analysis", list(classes or []) or None, _models(models), data_root)
    except (ConfigError, DataError, ArtifactError) as error:
        _fail(error)


@app.command()
def samples(runs: Path = typer.Option(Path("runs/fmnist-lt"), help="a dataset's run folder"),
            out: Optional[Path] = typer.Option(None, help="output folder (default: RUNS/analysis)"),
            limit: int = typer.Option(24, help="images in the grid"),
            models: Optional[List[str]] = ModelOpt, data_root: Optional[Path] = RootOpt) -> None:
    """A grid of test images DiVE gets right and CE or BSCE wrong (Appendix E)."""
    from stages import analysis

    try:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: show at least one image")
        analysis.samples(runs, out or runs / "analysis", limit, _models(models), data_root)
    except (ConfigError, DataError, ArtifactError) as error:
        _fail(error)


@app.command()
def settings(dataset: str = DatasetOpt,
             teacher_set: Optional[List[str]] = typer.Option(None, "--teacher", help="a teacher setting key=value"),
             cache_set: Optional[List[str]] = typer.Option(None, "--cache", help="a cache setting key=value"),
             student_set: Optional[List[str]] = typer.Option(None, "--student", help="a student setting key=value"),
             runs: Path = RunsOpt) -> None:
    """Print each stage's resolved settings, what differs from the defaults, its run folder and its state."""
    from stages.paths import folders, show

    try:
        typer.echo(show(folders(runs, dataset, teacher_set or [], cache_set or [], student_set or [])))
    except ConfigError as error:
        _fail(error)


@app.command()
def recipe(dataset: str = DatasetOpt) -> None:
    """Print a dataset's default settings, stage by stage."""
    from pipeline.settings import defaults_for

    try:
        defaults = defaults_for(dataset)
    except ConfigError as error:
        _fail(error)
    for stage in ("teacher", "cache", "student"):
        typer.echo(f"[{stage}]")
        values = defaults.of(stage)
        for key, value in values.to_dict().items():
            shown = "auto" if key == "micro_batch" and value == 0 else value
            typer.echo(f"{key:>16} = {shown}" + ("   (runtime)" if key in values.runtime_keys else ""))


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    app()
