"""Figures that compare the trained models of a dataset (DiVE's supplementary Appendices D and E):

- ``tsne``: a t-SNE of the penultimate-layer test features, one class from each frequency group, one panel per
  model (CE, BSCE teacher, DiVE student), with the classes' silhouette scores as the table.
- ``samples``: a grid of test images that DiVE gets right and CE or BSCE gets wrong, captioned with every
  model's prediction, coloured by the predicted class's group.

Both read what each run saved (``eval.npz``: per-sample test logits and features; ``metrics.json``: the class
counts), so no model is run again.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.data.sources import DataError, load_source
from pipeline.data.sources.base import GROUPS, class_groups
from store.manifest import ArtifactError, write_json_atomic

from .artifacts import collect_runs, in_sample_order, settings_of

GROUP_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
METHODS = ("CE", "BSCE", "DiVE")


def pick_models(runs: Path, chosen: dict[str, Path] | None = None) -> dict[str, Path]:
    """One run folder per method: the lowest-seed CE and BSCE teachers, and a cached DiVE student of that BSCE
    teacher's cache, at the dataset's default settings if there is one. ``chosen`` overrides any."""
    records = collect_runs(runs)
    picked: dict[str, Path] = {}

    def first(candidates):
        return min(candidates, key=lambda r: (r.seed, str(r.path))).path if candidates else None

    for method, name in (("CE", "CE"), ("BSCE", "BSCE (teacher)")):
        found = first([r for r in records if r.method == name])
        if found:
            picked[method] = found
    students = [r for r in records if r.method == "DiVE" and r.settings.mode == "cached"]
    if "BSCE" in picked:
        mine = [r for r in students if r.upstream == f"cache-{picked['BSCE'].name}"]
        students = mine or students
    if students:
        default = [r for r in students if not r.changed()]  # nothing differs from the defaults but the seed
        picked["DiVE"] = first(default or students)
    picked.update(chosen or {})
    missing = [m for m in METHODS if m not in picked]
    if missing:
        how = {"CE": "make teacher LOSS=ce", "BSCE": "make teacher", "DiVE": "make cache student"}
        raise ArtifactError(f"no complete {', '.join(missing)} run under {runs}; run "
                            + "; ".join(how[m] for m in missing) + " first (or name one with --model METHOD=PATH)")
    return {m: picked[m] for m in METHODS}


def load_evals(models: dict[str, Path]) -> tuple[dict[str, dict], np.ndarray, np.ndarray, str]:
    """Each model's test logits and features in test-sample order, the labels, the class counts and dataset."""
    evals, labels, counts, dataset = {}, None, None, None
    for method, folder in models.items():
        path = folder / "eval.npz"
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: {folder} is not a complete run")
        evals[method] = in_sample_order(np.load(path))
        manifest = json.loads((folder / "manifest.json").read_text())
        if labels is None:
            labels = evals[method]["labels"]
            counts = np.array(json.loads((folder / "metrics.json").read_text())["class_counts"])
            dataset = settings_of(manifest["config"], "teacher").dataset
        elif not np.array_equal(labels, evals[method]["labels"]):
            raise ArtifactError(f"{folder} was tested on other test samples than {models['CE']}; "
                                "compare runs of one dataset")
    return evals, labels, counts, dataset


def group_of(counts: np.ndarray) -> np.ndarray:
    """The group name (many / medium / few) of every class."""
    masks = class_groups(counts)
    names = np.empty(len(counts), dtype=object)
    for group in GROUPS:
        names[masks[group]] = group
    return names


def default_classes(counts: np.ndarray) -> list[int]:
    """One class from each non-empty group: the group's class of median training count."""
    masks = class_groups(counts)
    picked = []
    for group in GROUPS:
        members = np.flatnonzero(masks[group])
        if len(members):
            ranked = members[np.argsort(-counts[members], kind="stable")]
            picked.append(int(ranked[len(ranked) // 2]))
    return picked


def tsne(runs: Path, out: Path, classes: list[int] | None = None, chosen: dict[str, Path] | None = None,
         data_root: Path | None = None, log=print) -> dict:
    """t-SNE of the test features of ``classes`` for CE, BSCE and DiVE; writes tsne.png, tsne.md, tsne.json."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    models = pick_models(runs, chosen)
    evals, labels, counts, dataset = load_evals(models)
    source = source_or_none(dataset, data_root)
    names = class_names(dataset, data_root, len(counts), source)
    classes = classes or showcase(source, len(counts)) or default_classes(counts)
    bad = [c for c in classes if not 0 <= c < len(counts)]
    if bad:
        raise ArtifactError(f"--classes {bad}: {dataset} has classes 0..{len(counts) - 1}")
    groups = group_of(counts)
    keep = np.flatnonzero(np.isin(labels, classes))
    log(f"tsne: {dataset}, classes " + ", ".join(f"{c} {names[c]} ({groups[c]}, {counts[c]} train)" for c in classes)
        + f": {len(keep)} test images; models " + ", ".join(f"{m} {p.name}" for m, p in models.items()))
    result = {"classes": classes, "models": {m: str(p) for m, p in models.items()}, "scores": {}}
    embeddings = {}
    for method in METHODS:
        if "features" not in evals[method]:
            raise ArtifactError(f"{models[method] / 'eval.npz'} holds no features; rerun that stage")
        feats = evals[method]["features"][keep].astype(np.float32)
        emb = TSNE(n_components=2, perplexity=min(30.0, (len(keep) - 1) / 3), init="pca",
                   random_state=0).fit_transform(feats)
        embeddings[method] = emb
        y = labels[keep]
        scores = {"silhouette_features": float(silhouette_score(feats, y)),
                  "silhouette_tsne": float(silhouette_score(emb, y))}
        for c in classes:
            mask = labels == c
            scores[f"acc_{c}"] = 100.0 * float((evals[method]["logits"][mask].argmax(1) == c).mean())
        result["scores"][method] = scores
        log(f"  {method}: silhouette {scores['silhouette_features']:.3f} (features), "
            f"{scores['silhouette_tsne']:.3f} (t-SNE)")
    out.mkdir(parents=True, exist_ok=True)
    _plot_tsne(out / "tsne.png", embeddings, labels[keep], classes, names, groups, models)
    lines = [f"# t-SNE of test features: {dataset}", "",
             "| model | run | silhouette (features) | silhouette (t-SNE) | "
             + " | ".join(f"acc {names[c]} ({groups[c]})" for c in classes) + " |",
             "|---|---|---|---|" + "---|" * len(classes)]
    for method in METHODS:
        s = result["scores"][method]
        lines.append(f"| {method} | {models[method].name} | {s['silhouette_features']:.3f} | "
                     f"{s['silhouette_tsne']:.3f} | " + " | ".join(f"{s[f'acc_{c}']:.1f}" for c in classes) + " |")
    lines += ["", "Silhouette of the chosen classes' test images (higher: tighter, better separated clusters); "
              "accuracy (%) on each class's test images."]
    (out / "tsne.md").write_text("\n".join(lines) + "\n")
    write_json_atomic(out / "tsne.json", result)
    log("\n".join(lines))
    log(f"wrote {out / 'tsne.png'} and {out / 'tsne.md'}")
    return result


TSNE_MARKERS = ("o", "^", "s", "D")


def _plot_tsne(path, embeddings, y, classes, names, groups, models) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_font_for(names[c] for c in classes)
    fig, axes = plt.subplots(1, len(embeddings), figsize=(4.4 * len(embeddings), 4.4), dpi=120, squeeze=False)
    colours = [GROUP_COLOURS[groups[c]] for c in classes]
    # classes of one group share a colour, so each also gets its own marker and its name at the cluster's median
    markers = [TSNE_MARKERS[[groups[k] for k in classes[:i]].count(groups[c]) % len(TSNE_MARKERS)]
               for i, c in enumerate(classes)]
    for ax, (method, emb) in zip(axes[0], embeddings.items()):
        for c, colour, marker in zip(classes, colours, markers):
            pts = emb[y == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, color=colour, marker=marker,
                       label=f"{names[c]} ({groups[c]})")
            if len(pts):
                centre = np.median(pts, axis=0)
                ax.annotate(names[c], centre, fontsize=11, ha="center", va="center", color=colour,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})
        ax.set_title(f"{method}  ({models[method].name})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=8, markerscale=4, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def source_or_none(dataset: str, data_root: Path | None):
    """The dataset's source, or None where its data is not at hand (the figures then number the classes)."""
    try:
        return load_source(dataset, data_root)
    except DataError:
        return None


def class_names(dataset: str, data_root: Path | None, num_classes: int, source=None) -> list[str]:
    """The dataset's class names, or the class numbers where the data (and so its names) is not at hand."""
    source = source or source_or_none(dataset, data_root)
    names = source.class_names if source is not None else ()
    return list(names) if len(names) == num_classes else [str(c) for c in range(num_classes)]


def showcase(source, num_classes: int) -> list[int]:
    """The classes a dataset proposes for figures (glyph-lt: look-alike characters across the groups), where
    the runs have its class count; else none."""
    picked = list(source.info.get("showcase", ())) if source is not None else []
    return picked if source is not None and source.num_classes == num_classes else []


# Typefaces for class names in figures, where the names need them (glyph-lt's characters): the first found.
CJK_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")


def use_font_for(names) -> None:
    """Make matplotlib draw ``names`` with a CJK typeface when any holds a CJK character (DejaVu, its default,
    has none and would draw boxes), keeping DejaVu Sans for Latin text."""
    if not any(ord(ch) >= 0x2E80 for name in names for ch in name):
        return
    import logging

    from matplotlib import font_manager, rcParams

    # WenQuanYi's one weight is 500: matplotlib would warn on every text that it has no "normal" (400)
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    for path in CJK_FONTS:
        if Path(path).is_file():
            font_manager.fontManager.addfont(path)
            rcParams["font.family"] = ["sans-serif"]
            rcParams["font.sans-serif"] = [font_manager.FontProperties(fname=path).get_name(), "DejaVu Sans"]
            return
    raise ArtifactError("the class names are CJK characters and no CJK font is installed: apt-get install "
                        "fonts-wqy-zenhei (make installs it with glyph-lt's fonts)")


def pick_samples(evals: dict[str, dict], labels: np.ndarray, counts: np.ndarray,
                 limit: int) -> tuple[np.ndarray, int]:
    """Test samples DiVE gets right and CE or BSCE wrong, taken in turn from each true class (rarest class
    first, so the grid shows several classes); within a class, those both get wrong first, then file order.
    Returns up to ``limit`` of them and how many there are in all."""
    pred = {m: evals[m]["logits"].argmax(1) for m in METHODS}
    right = pred["DiVE"] == labels
    wrong_others = (pred["CE"] != labels).astype(int) + (pred["BSCE"] != labels).astype(int)
    found = np.flatnonzero(right & (wrong_others > 0))
    queues = []
    for c in sorted(set(labels[found].tolist()), key=lambda c: (counts[c], c)):
        mine = found[labels[found] == c]
        queues.append(list(mine[np.lexsort((mine, -wrong_others[mine]))]))
    picked = []
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return np.array(picked, dtype=np.int64), len(found)


def samples(runs: Path, out: Path, limit: int = 24, chosen: dict[str, Path] | None = None,
            data_root: Path | None = None, log=print) -> dict:
    """A grid of test images DiVE gets right and CE or BSCE wrong; writes samples.png, samples.md, samples.json."""
    models = pick_models(runs, chosen)
    evals, labels, counts, dataset = load_evals(models)
    source = load_source(dataset, data_root)
    if len(source.test) != len(labels) or not np.array_equal(source.test.labels, labels):
        raise ArtifactError(f"the runs under {runs} were tested on another {dataset} test split than "
                            f"the one at {data_root or 'its default place'}")
    names = class_names(dataset, data_root, len(counts), source)
    groups = group_of(counts)
    pred = {m: evals[m]["logits"].argmax(1) for m in METHODS}
    chosen_idx, n_all = pick_samples(evals, labels, counts, limit)
    log(f"samples: {n_all} test images that DiVE gets right and CE or BSCE wrong; showing {len(chosen_idx)}")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"test_index": int(i), "true": names[labels[i]], "true_group": groups[labels[i]],
             **{m: names[pred[m][i]] for m in METHODS}} for i in chosen_idx]
    if len(chosen_idx):
        _plot_samples(out / "samples.png", source.test, chosen_idx, labels, pred, names, groups)
    lines = [f"# Test images DiVE gets right and CE or BSCE wrong: {dataset}", "",
             f"{n_all} such images in the test split; {len(rows)} of them, taken in turn from each true class "
             "(rarest class first):", "",
             "| test index | true class (group) | CE | BSCE | DiVE |", "|---|---|---|---|---|"]
    lines += [f"| {r['test_index']} | {r['true']} ({r['true_group']}) | {r['CE']} | {r['BSCE']} | {r['DiVE']} |"
              for r in rows]
    (out / "samples.md").write_text("\n".join(lines) + "\n")
    write_json_atomic(out / "samples.json", {"models": {m: str(p) for m, p in models.items()}, "count": n_all,
                                             "rows": rows})
    log("\n".join(lines))
    log(f"wrote {out / 'samples.png'} and {out / 'samples.md'}")
    return {"count": n_all, "rows": rows}


def display_image(split, i: int) -> np.ndarray:
    """A test image for display: uint8 [H, W] or [H, W, 3]."""
    if split.in_memory:
        img = split.images[i]
        return img[..., 0] if img.shape[-1] == 1 else img
    from PIL import Image

    with Image.open(split.files[i]) as im:
        im = im.convert("RGB")
        im.thumbnail((128, 128))
        return np.asarray(im)


def _plot_samples(path, split, chosen, labels, pred, names, groups) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    use_font_for(names)
    cols = min(6, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 3.0 * rows + 0.4), dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen):
        img = display_image(split, i)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_title(f"#{i} true: {names[labels[i]]}", fontsize=7, color=GROUP_COLOURS[groups[labels[i]]])
        for line, method in enumerate(METHODS):
            p = pred[method][i]
            mark = "ok" if p == labels[i] else "x"
            ax.text(0.5, -0.04 - 0.13 * line, f"{method}: {names[p]} [{mark}]", transform=ax.transAxes,
                    ha="center", va="top", fontsize=7, color=GROUP_COLOURS[groups[p]])
    handles = [Line2D([], [], color=c, lw=3, label=f"{g} class") for g, c in GROUP_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.3 / (3.0 * rows + 0.4), bottom=1.2 / (3.0 * rows + 0.4),
                        wspace=0.15, hspace=0.75)
    fig.savefig(path)
    plt.close(fig)
