"""Run folders from settings, for Make and for people: ``python3 -m stages.paths``.

Make calls this with the system Python when it reads the Makefile (it imports the standard library only, so
it works before the virtual environment exists), and uses the folders it prints as its targets. The stage
commands find the same folders through the same functions, so Make and the CLI never disagree on a name.

Output: the teacher, cache and student folders on one line; ``--show`` prints each stage's resolved settings,
what differs from the defaults, its folder and whether it is complete (that is what `make plan` shows).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.run_names import cache_dir, differences, student_dir, teacher_dir
from pipeline.settings import STAGES, ConfigError, defaults_for, resolve

MANIFEST = "manifest.json"  # store.manifest.MANIFEST (numpy-free import here)


def folders(runs: Path, dataset: str, teacher: list[str], cache: list[str], student: list[str]):
    """(settings, folder) of the teacher, cache and student that these overrides name."""
    t = resolve("teacher", dataset, teacher)
    c = resolve("cache", dataset, cache)
    s = resolve("student", dataset, student)
    t_dir = teacher_dir(runs, t)
    c_dir = cache_dir(t_dir, c, dataset)
    return [("teacher", t, t_dir), ("cache", c, c_dir), ("student", s, student_dir(c_dir, s, dataset))]


def show(stages) -> str:
    """Each stage's folder, state, differences from the defaults and runtime settings, as lines of text."""
    defaults = defaults_for(stages[0][1].dataset)
    lines = []
    for stage, settings, folder in stages:
        state = "complete" if (folder / MANIFEST).is_file() else "would run"
        diffs = differences(settings, defaults.of(stage))
        changed = ", ".join(f"{k}={v}" for k, v in diffs.items()) or "the defaults"
        lines.append(f"{stage:8} {state:10} {folder}")
        lines.append(f"{'':8} settings: {changed}")
        lines.append(f"{'':8} runtime:  {', '.join(f'{k}={v}' for k, v in settings.runtime().items())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m stages.paths", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--dataset", default="fmnist-lt")
    for stage in STAGES:
        parser.add_argument(f"--{stage}", action="append", default=[], metavar="KEY=VALUE",
                            help=f"a {stage} setting (repeatable)")
    parser.add_argument("--show", action="store_true", help="settings, differences and state of each stage")
    args = parser.parse_args(argv)
    try:
        stages = folders(args.runs, args.dataset, args.teacher, args.cache, args.student)
    except ConfigError as error:
        print(f"error: {error}")
        return 2
    print(show(stages) if args.show else " ".join(str(folder) for _, _, folder in stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
