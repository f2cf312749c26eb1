"""The report of ``mobilenet reproduce``: ``results.json``, ``results.md`` and three plots from the finished runs.

Each experiment's rows are compared as the paper compares them (:func:`direction`: the sign of the top-1
difference against ``rows[0]`` and the ratio of multiply-adds); models not trained yet are listed with their
analytic cost only, so a partial report can be written after every finished run.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mobilenet.cost import MAC_CONVENTION, CostTable, count_costs
from mobilenet.io import atomic_write_text
from mobilenet.paper import V1_TABLE2, PaperRow
from mobilenet.plots import plot_accuracy_vs_cost, plot_macs_by_operator
from mobilenet.reproduce_experiments import CIFAR_CLASSES, Budget, Experiment, Row, RunSpec, plan_runs
from mobilenet.runtime import describe_machine

__all__ = [
    "ABOUT_ONE_POINT",
    "CLAIMS",
    "NOISE_POINTS",
    "REPORT_FILES",
    "Claim",
    "base_record",
    "claims",
    "direction",
    "mean_records",
    "write_report",
]

#: The files of a report, written into its directory by :func:`write_report`.
REPORT_FILES = ("results.json", "results.md", "accuracy_vs_macs.png", "accuracy_vs_params.png", "macs_by_operator.png")

#: A difference in top-1 smaller than this (percentage points) is called a tie: one seed of a short run, and the
#: 10,000-image test set's own standard error (docs/reproduce.md).
NOISE_POINTS = 1.0

# --------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------


def base_record(spec: RunSpec, cost: CostTable, num_classes: int) -> dict[str, Any]:
    """The fields a run's record has whether it is finished or pending: which model, and the cost model's figures."""
    return {
        "key": spec.key,
        "label": spec.label,
        "model": spec.model,
        "alpha": spec.alpha,
        "resolution": spec.resolution,
        "small_input": spec.small_input,
        "num_classes": num_classes,
        "macs": cost.macs,
        "params": cost.params,
        "trainable_params": cost.trainable_params,
        "by_op": [share.to_dict() for share in cost.by_op()],
    }


def _model_record(spec: RunSpec, finished: dict[str, dict[str, Any]], num_classes: int) -> dict[str, Any]:
    if spec.key in finished:
        return {**finished[spec.key], "status": "finished"}
    return {
        **base_record(spec, spec.cost(num_classes), num_classes),
        "test_top1": None,
        "latency_ms": None,
        "status": "pending",
    }


def _paper_record(paper: PaperRow) -> dict[str, Any]:
    """A published row as the report states it (which of our registered models it is costed as is left out)."""
    return {"label": paper.label, "top1": paper.top1, "macs_m": paper.macs_m, "params_m": paper.params_m}


def direction(experiment: Experiment, row: Row, finished: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The paper's direction for ``row`` against ``experiment.rows[0]`` and what this run shows."""
    ref = experiment.rows[0]
    paper_delta = row.paper.top1 - ref.paper.top1
    paper_ratio = row.paper.macs_m / ref.paper.macs_m
    ours_ratio = row.run.cost().macs / ref.run.cost().macs
    comparison: dict[str, Any] = {
        "model": row.run.key,
        "reference": ref.run.key,
        "paper_delta_points": round(paper_delta, 2),
        "paper_macs_ratio": round(paper_ratio, 3),
        "macs_ratio": round(ours_ratio, 3),
        "delta_points": None,
        "verdict": "pending",
    }
    text_paper = f"paper: {paper_delta:+.1f} points for {paper_ratio:.2f}x MACs"
    if row.run.key not in finished or ref.run.key not in finished:
        comparison["text"] = f"{row.run.label} vs {ref.run.label}: {text_paper}; here: not trained yet"
        return comparison
    delta = 100 * (finished[row.run.key]["test_top1"] - finished[ref.run.key]["test_top1"])
    comparison["delta_points"] = round(delta, 2)
    if abs(delta) < NOISE_POINTS:
        verdict = "tie"
    elif (delta > 0) == (paper_delta > 0):
        verdict = "agrees"
    else:
        verdict = "disagrees"
    comparison["verdict"] = verdict
    text_here = f"here: {delta:+.1f} points for {ours_ratio:.2f}x MACs"
    words = {
        "agrees": "same direction as the paper",
        "tie": f"a tie (within {NOISE_POINTS:g} point, one seed's noise)",
        "disagrees": "the opposite of the paper",
    }[verdict]
    comparison["text"] = f"{row.run.label} vs {ref.run.label}: {text_paper}; {text_here}: {words}"
    return comparison


# --------------------------------------------------------------------------------------------------------------
# Several seeds: each model's mean and spread, and a verdict per claim of the papers
# --------------------------------------------------------------------------------------------------------------

#: "Within about 1 point" (V1 Table 4: full convolutions 71.7%, separable 70.6%): a gap up to this many points.
ABOUT_ONE_POINT = 1.5


@dataclass(frozen=True)
class Claim:
    """One of the papers' conclusions as a test on CIFAR-10 top-1 differences between rows of an experiment.

    ``pairs`` are (row index, row index): with ``kind`` "beats" the first must be the more accurate; with "within"
    the first may be ahead by at most :data:`ABOUT_ONE_POINT`. All pairs must hold."""

    experiment: str
    statement: str
    kind: str
    pairs: tuple[tuple[int, int], ...]


#: The claims the report judges, in the papers' words (rows as in :mod:`mobilenet.reproduce_experiments`).
CLAIMS = (
    Claim(
        "table4",
        "V1 Table 4: depthwise separable convolutions lose only about 1 point against full convolutions, at 1/8 the "
        "multiply-adds",
        "within",
        ((1, 0),),
    ),
    Claim("table5", "V1 Table 5: at equal cost, a narrower network beats a shallower one", "beats", ((0, 1),)),
    Claim(
        "table6",
        "V1 Table 6: accuracy falls monotonically as the width multiplier shrinks",
        "beats",
        ((0, 1), (1, 2), (2, 3)),
    ),
    Claim(
        "table7",
        "V1 Table 7: accuracy falls monotonically as the resolution shrinks",
        "beats",
        ((0, 1), (1, 2), (2, 3)),
    ),
    Claim("v1-vs-v2", "V2 Table 4: MobileNetV2 beats MobileNetV1 at equal multiply-adds", "beats", ((2, 0),)),
)


def mean_records(by_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each model finished under at least one seed, as one record: the first seed's, with ``test_top1`` the mean
    over its seeds, ``top1_by_seed`` ({seed: top-1}) and ``top1_spread`` (half the range, in top-1 units)."""
    merged: dict[str, dict[str, Any]] = {}
    for seed, finished in sorted(by_seed.items()):
        for key, record in finished.items():
            merged.setdefault(key, {**record, "top1_by_seed": {}})["top1_by_seed"][str(seed)] = record["test_top1"]
    for record in merged.values():
        values = list(record["top1_by_seed"].values())
        record["test_top1"] = statistics.mean(values)
        record["top1_spread"] = (max(values) - min(values)) / 2
        record["seeds"] = len(values)
    return merged


def _pair_difference(higher: str, lower: str, by_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The top-1 difference ``higher`` minus ``lower`` in points, per seed where both finished, its mean and its
    margin: half the range over the seeds, or :data:`NOISE_POINTS` with one seed."""
    per_seed = {
        seed: 100 * (finished[higher]["test_top1"] - finished[lower]["test_top1"])
        for seed, finished in sorted(by_seed.items())
        if higher in finished and lower in finished
    }
    if not per_seed:
        return None
    values = list(per_seed.values())
    margin = (max(values) - min(values)) / 2 if len(values) > 1 else NOISE_POINTS
    return {
        "higher": higher,
        "lower": lower,
        "by_seed": {str(seed): round(value, 2) for seed, value in per_seed.items()},
        "mean_points": round(statistics.mean(values), 2),
        "margin_points": round(margin, 2),
    }


def _pair_verdict(kind: str, pair: dict[str, Any]) -> str:
    """Whether a pair's difference d (mean +/- margin m) holds the claim beyond its margin (agrees), fails it beyond
    its margin (disagrees), or has the claim's bound within its margin (inconclusive). "beats": d > 0; "within":
    d <= :data:`ABOUT_ONE_POINT` (the first row, the costlier one, is ahead by about 1 point at most)."""
    d, m = pair["mean_points"], pair["margin_points"]
    if kind == "within":
        return "agrees" if d + m <= ABOUT_ONE_POINT else "disagrees" if d - m > ABOUT_ONE_POINT else "inconclusive"
    return "agrees" if d - m > 0 else "disagrees" if d + m < 0 else "inconclusive"


def claims(chosen: Sequence[Experiment], by_seed: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """A verdict per claim of :data:`CLAIMS` whose experiment was run: "agrees" when every pair holds beyond its
    margin, "disagrees" when any pair fails beyond it, "inconclusive" otherwise, "pending" until trained."""
    experiments_by_name = {experiment.name: experiment for experiment in chosen}
    found = []
    for claim in CLAIMS:
        experiment = experiments_by_name.get(claim.experiment)
        if experiment is None:
            continue
        runs = [row.run for row in experiment.rows]
        pairs = [_pair_difference(runs[i].key, runs[j].key, by_seed) for i, j in claim.pairs]
        ratios = [round(runs[i].cost().macs / runs[j].cost().macs, 3) for i, j in claim.pairs]
        verdicts = ["pending" if pair is None else _pair_verdict(claim.kind, pair) for pair in pairs]
        if "pending" in verdicts:
            verdict = "pending"
        elif "disagrees" in verdicts:
            verdict = "disagrees"
        else:
            verdict = "agrees" if all(v == "agrees" for v in verdicts) else "inconclusive"
        found.append(
            {
                "experiment": claim.experiment,
                "claim": claim.statement,
                "verdict": verdict,
                "pairs": [
                    {**pair, "macs_ratio": ratio, "verdict": v}
                    for pair, ratio, v in zip(pairs, ratios, verdicts, strict=True)
                    if pair is not None
                ],
            }
        )
    return found


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def _document(chosen: Sequence[Experiment], budget: Budget, finished: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``results.json``: the budget, the machine, every model's record and every experiment's comparisons."""
    num_classes = next((record["num_classes"] for record in finished.values()), CIFAR_CLASSES)
    models = {spec.key: _model_record(spec, finished, num_classes) for spec in plan_runs(chosen)}
    done = [record for record in models.values() if record["status"] == "finished"]
    return {
        "title": "The MobileNet papers' trade-offs on CIFAR-10",
        "budget": {
            **asdict(budget),
            "images_per_run": next((record["images_seen"] for record in done), None),
            "train_images": next((record["train_images"] for record in done), None),
            "train_seconds_total": sum(record["train_seconds"] for record in done),
            "wall_seconds_total": sum(record["wall_seconds"] for record in done),
        },
        "hardware": describe_machine(),
        "convention": MAC_CONVENTION,
        "noise_points": NOISE_POINTS,
        "finished": len(done),
        "total": len(models),
        "models": models,
        "experiments": [
            {
                "name": experiment.name,
                "title": experiment.title,
                "source": experiment.source,
                "claim": experiment.claim,
                "caveat": experiment.caveat,
                "rows": [{"model": row.run.key, "paper": _paper_record(row.paper)} for row in experiment.rows],
                "comparisons": [direction(experiment, row, finished) for row in experiment.rows[1:]],
            }
            for experiment in chosen
        ],
    }


def _plots(out: Path, chosen: Sequence[Experiment], budget: Budget, document: dict[str, Any]) -> dict[str, Path]:
    """Accuracy against multiply-adds and against parameters, and the multiply-adds by operator type beside the
    V1 paper's Table 2."""
    models = document["models"]
    done = [record for record in models.values() if record["status"] == "finished"]
    series = [
        (f"{e.source}: {e.title.lower()}", [row.run.key for row in e.rows]) for e in chosen if e.series and e.rows
    ]
    points = [
        {
            "key": r["key"],
            "label": r["label"].replace(" @32px", ""),
            "macs": r["macs"],
            "params": r["params"],
            "top1": r["test_top1"],
        }
        for r in done
    ]
    subtitle = f"CIFAR-10 test top-1, budget {budget.name} ({len(done)}/{len(models)} models trained)"
    files = {
        "accuracy_vs_macs": plot_accuracy_vs_cost(
            points, series, out / "accuracy_vs_macs.png", x="macs", title=f"Accuracy vs multiply-adds: {subtitle}"
        ),
        "accuracy_vs_params": plot_accuracy_vs_cost(
            points, series, out / "accuracy_vs_params.png", x="params", title=f"Accuracy vs parameters: {subtitle}"
        ),
    }
    paper_total = count_costs("mobilenet_v1_1.0_224").macs  # V1 Table 2 is MobileNet 1.0 at 224 px
    paper_row = {
        "label": "V1 paper Table 2 (1.0 @224px, ImageNet)",
        "macs": paper_total,
        "by_op": [{"type": kind, "macs": share / 100 * paper_total} for kind, (share, _) in V1_TABLE2.items()],
    }
    ours = (
        {"label": r["label"], "by_op": r["by_op"], "macs": r["macs"]}
        for r in sorted(models.values(), key=lambda r: r["macs"])
    )
    files["macs_by_operator"] = plot_macs_by_operator(
        [paper_row, *ours],
        out / "macs_by_operator.png",
        title="Where the multiply-adds go, by operator type (V1 paper Table 2), CIFAR-10 inputs",
    )
    return files


def write_report(
    out: str | os.PathLike[str],
    chosen: Sequence[Experiment],
    budget: Budget,
    finished: dict[str, dict[str, Any]],
    *,
    by_seed: dict[int, dict[str, dict[str, Any]]] | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write ``results.json``, ``results.md`` and the plots for the finished runs (pending ones are listed with
    their analytic cost only). ``by_seed`` (seed -> that seed's finished runs) replaces ``finished`` with each
    model's mean over the seeds (:func:`mean_records`) and adds the verdict per claim (:func:`claims`). Returns
    the JSON document and the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if by_seed is not None:
        finished = mean_records(by_seed)
    document = _document(chosen, budget, finished)
    if by_seed is not None:
        document["seeds"] = sorted(by_seed)
        document["claims"] = claims(chosen, by_seed)
    files = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write_text(files["json"], json.dumps(document, indent=2) + "\n")
    files.update(_plots(out, chosen, budget, document))
    atomic_write_text(files["markdown"], _markdown(document, chosen, files))
    return document, files


# --------------------------------------------------------------------------------------------------------------
# results.md
# --------------------------------------------------------------------------------------------------------------


def _fmt_top1(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _markdown_header(document: dict[str, Any], files: dict[str, Path]) -> list[str]:
    """The title, the budget, the hardware, how many models finished, the conventions and the plots."""
    budget = document["budget"]
    hw = document["hardware"]
    models = document["models"]
    per_epoch = f"{budget['batches_per_epoch']} batches" if budget["batches_per_epoch"] else "the whole training set"
    seen = (
        f" ({budget['images_per_run']:,} training images per model, "
        f"{budget['images_per_run'] / budget['train_images']:.2f} passes over the {budget['train_images']:,})"
        if budget["images_per_run"]
        else ""
    )
    return [
        f"# {document['title']}",
        "",
        f"Budget **{budget['name']}**: {budget['epochs']} epochs of {per_epoch} of {budget['batch_size']} images"
        f"{seen}, recipe `{budget['recipe']}`, seed {budget['seed']}, EMA {budget['ema_decay']:g}: the same for "
        f"every model. Sizing: {budget['sizing']}.",
        "",
        f"Hardware: {hw['cpu']} ({hw['cpu_cores']} cores), torch {hw['torch']}, {hw['torch_threads']} threads"
        + (f", GPU {hw['gpu']}" if hw["gpu"] else "")
        + f". Training time of the {document['finished']} finished models: "
        f"{budget['train_seconds_total'] / 60:.1f} min ({budget['wall_seconds_total'] / 60:.1f} min wall with "
        "evaluation and timing).",
        "",
        f"**{document['finished']} of {document['total']} models finished.**"
        + (
            " Pending: " + ", ".join(f"`{key}`" for key, r in models.items() if r["status"] != "finished") + "."
            if document["finished"] < document["total"]
            else ""
        ),
        "",
        f"Inputs are CIFAR-10 images at 32x32 (or resized for the resolution rows), networks with `small_input` (total "
        f"stride 8). MACs and parameters are the cost model's at that input size ({document['convention']}); latency "
        "is the median of one 1-image forward pass on the CPU, measured right after training. Top-1 is the last "
        "epoch's, on the 10,000 test images. The paper's numbers are ImageNet top-1 at 224 px.",
        "",
        f"![accuracy vs MACs]({files['accuracy_vs_macs'].name}) ![accuracy vs parameters]"
        f"({files['accuracy_vs_params'].name})",
        "",
        f"![MACs by operator type]({files['macs_by_operator'].name})",
        "",
    ]


def _markdown_experiment(entry: dict[str, Any], experiment: Experiment, document: dict[str, Any]) -> list[str]:
    """One experiment: its table of our models beside the paper's rows, the comparisons, and the caveat where
    CIFAR-10 disagrees."""
    budget = document["budget"]
    models = document["models"]
    lines = [
        f"## {entry['source']}: {entry['title']} (`{entry['name']}`)",
        "",
        f"Paper: {entry['claim']}.",
        "",
        "| model | input | MACs | params | CPU latency, batch 1 | CIFAR-10 top-1 | paper row | paper top-1 | "
        "paper MACs | paper params |",
        "|---|--:|--:|--:|--:|--:|---|--:|--:|--:|",
    ]
    for row in experiment.rows:
        r = models[row.run.key]
        latency = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f} ms"
        lines.append(
            f"| {r['label']} | {r['resolution']} px | {r['macs'] / 1e6:.1f}M | {r['params'] / 1e6:.2f}M | "
            f"{latency} | {_fmt_top1(r['test_top1'])} | {row.paper.label} | {row.paper.top1:.1f}% | "
            f"{row.paper.macs_m:g}M | {row.paper.params_m:g}M |"
        )
    lines.append("")
    for comparison in entry["comparisons"]:
        lines.append(f"- {comparison['text']}.")
    if any(c["verdict"] == "disagrees" for c in entry["comparisons"]):
        short = (
            f"only {budget['images_per_run'] / budget['train_images']:.2f} passes over the training set, where "
            "how fast a model learns per step matters more than its final capacity; "
            if budget["images_per_run"] and budget["images_per_run"] < 5 * budget["train_images"]
            else ""
        )
        lines.append(f"- Where CIFAR-10 disagrees, the likely reasons: {short}{entry['caveat']}.")
    lines.append("")
    return lines


def _fmt_pair(pair: dict[str, Any]) -> str:
    seeds = ", ".join(f"{value:+.1f}" for value in pair["by_seed"].values())
    return (
        f"`{pair['higher']}` - `{pair['lower']}` ({pair['macs_ratio']:.2f}x MACs): {pair['mean_points']:+.1f} +/- "
        f"{pair['margin_points']:.1f} points (seeds: {seeds}): {pair['verdict']}"
    )


def _markdown_claims(document: dict[str, Any]) -> list[str]:
    """The verdict per claim, with each pair's mean difference and margin, then each model's mean and spread."""
    seeds = document["seeds"]
    lines = [
        "## The papers' claims on CIFAR-10",
        "",
        f"Each difference is the mean over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}) +/- half its range "
        f"over the seeds ({NOISE_POINTS:g} point with one seed). A claim **agrees** when every difference holds "
        "beyond that margin, **disagrees** when one fails beyond it, and is **inconclusive** otherwise.",
        "",
        "| claim | CIFAR-10 | verdict |",
        "|---|---|---|",
    ]
    for claim in document["claims"]:
        detail = "<br>".join(_fmt_pair(pair) for pair in claim["pairs"]) or "not trained yet"
        lines.append(f"| {claim['claim']} | {detail} | **{claim['verdict']}** |")
    lines += ["", "| model | mean top-1 | +/- (half range) | per seed |", "|---|--:|--:|---|"]
    for record in document["models"].values():
        if record["status"] != "finished":
            continue
        per_seed = ", ".join(f"{seed}: {100 * top1:.2f}%" for seed, top1 in record["top1_by_seed"].items())
        lines.append(
            f"| {record['label']} | {_fmt_top1(record['test_top1'])} | {100 * record['top1_spread']:.2f} | {per_seed} |"
        )
    return [*lines, ""]


def _markdown(document: dict[str, Any], chosen: Sequence[Experiment], files: dict[str, Path]) -> str:
    lines = _markdown_header(document, files)
    if "claims" in document:
        lines += _markdown_claims(document)
    experiments_by_name = {e.name: e for e in chosen}
    for entry in document["experiments"]:
        lines += _markdown_experiment(entry, experiments_by_name[entry["name"]], document)
    return "\n".join(lines)
