"""`spafl report`: summary tables and plots of finished (or running) runs."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from spafl.runtime.record import METRICS, ROW_EVAL_NUMBERS, read_metrics
from spafl.runtime.record import summarize_run
from spafl.errors import UserError, file_error, short_path
from spafl.metrics import GIGA


def load_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl; UserError if there is none, or a line is not a row, or none is evaluated."""
    path = Path(run_dir) / METRICS
    if not os.path.lexists(path):
        raise UserError(f"{short_path(run_dir)} is not a spafl run directory (no {METRICS})")
    rows = read_metrics(path)
    if not rows:
        raise UserError(f"{short_path(path)} has no rounds yet")
    if not any(row["evaluated"] for row in rows):
        raise UserError(f"{short_path(path)} has no evaluated round yet")
    for row in rows:  # the table and the plots need every figure of an evaluated round
        absent = [key for key in ROW_EVAL_NUMBERS if row["evaluated"] and row[key] is None]
        if absent:
            raise UserError(f"{short_path(path)}: round {row['round']} is evaluated but has no {', '.join(absent)}; the file is damaged")
    return rows


def format_summary(run_dir: str | Path, summary: dict[str, Any]) -> str:
    final, best, sparsest = summary["final"], summary["best_round"], summary["lowest_density"]
    lines = [
        f"run {run_dir}: {summary['rounds']} rounds",
        f"  {'':22}{'round':>6}{'accuracy %':>12}{'density':>9}{'density_w':>11}",
        f"  {'final':22}{final['round']:>6}{final['accuracy']:>12.2f}{final['density']:>9.3f}{final['density_weighted']:>11.3f}",
        f"  {'best round':22}{best['round']:>6}{best['accuracy']:>12.2f}{best['density']:>9.3f}",
        f"  {'lowest density':22}{sparsest['round']:>6}{sparsest['accuracy']:>12.2f}{sparsest['density']:>9.3f}",
        f"  {'majority-class floor':22}{'':>6}{final['accuracy_majority']:>12.2f}",
        f"  communication {summary['gbit_total']:.6g} Gbit, training FLOPs {summary['flops_total']:.4g} "
        f"(reference count, per client), wall time {summary['seconds_total']:.1f} s",
        "  (accuracy: mean over clients of own-test-split accuracy; density: layer-mean, density_w: parameter-weighted)",
    ]
    return "\n".join(lines)


def table(runs: dict[str, dict[str, Any]]) -> str:
    header = f"{'run':40} {'rounds':>6} {'acc %':>7} {'floor %':>8} {'best %':>7} {'density':>8} {'dens_w':>7} {'Gbit':>10} {'FLOPs':>10} {'sec':>7}"
    lines = [header, "-" * len(header)]
    for name, s in runs.items():
        f = s["final"]
        lines.append(
            f"{name[-40:]:40} {s['rounds']:>6} {f['accuracy']:>7.2f} {f['accuracy_majority']:>8.2f} {s['best_round']['accuracy']:>7.2f} "
            f"{f['density']:>8.3f} {f['density_weighted']:>7.3f} {s['gbit_total']:>10.4g} {s['flops_total']:>10.3g} {s['seconds_total']:>7.0f}"
        )
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_figure(
    path: Path, lines: Iterable[tuple[Sequence[float], Sequence[float], dict[str, Any]]], *, size: tuple[float, float] = (6, 4),
    hline: tuple[float, dict[str, Any]] | None = None, notes: Iterable[tuple[str, tuple[float, float]]] = (),
    xscale: str | None = None, grid: str = "major", legend: dict[str, Any] | None = None,
    bands: Iterable[tuple[Sequence[float], Sequence[float], Sequence[float], dict[str, Any]]] = (), **axes: Any,
) -> Path:
    """One figure of lines, saved as ``path``.

    ``lines``: ``(xs, ys, style)`` with matplotlib's plot keywords; ``bands``:
    ``(xs, low, high, style)`` shaded between two curves; ``hline``:
    ``(y, style)`` of a horizontal reference line; ``notes``: ``(text, (x, y))``
    written beside points; ``axes``: Axes properties (xlabel, ylabel, title,
    ylim); ``legend``: the legend's keywords, None for no legend.
    """
    fig, ax = pyplot().subplots(figsize=size)
    for xs, low, high, style in bands:
        ax.fill_between(xs, low, high, linewidth=0, **style)
    for xs, ys, style in lines:
        ax.plot(xs, ys, **style)
    if hline is not None:
        ax.axhline(hline[0], **hline[1])
    for text, xy in notes:
        ax.annotate(text, xy, fontsize=8, xytext=(4, 4), textcoords="offset points")
    if xscale is not None:
        ax.set_xscale(xscale)
    ax.set(**axes)
    ax.grid(alpha=0.3, which=grid)
    if legend is not None:
        ax.legend(**legend)
    return _save(fig, path)


def plot_run(run_dir: str | Path, rows: list[dict[str, Any]]) -> list[Path]:
    run_dir = Path(run_dir)
    evaluated = [r for r in rows if r["evaluated"]]
    rounds = [r["round"] for r in evaluated]

    def series(key: str, **style: Any) -> tuple[list[int], list[float], dict[str, Any]]:
        return rounds, [r[key] for r in evaluated], style

    figures = [
        line_figure(
            run_dir / "accuracy.png",
            [series("accuracy", marker=".", label="accuracy (mean over clients)"),
             series("accuracy_weighted", linestyle=":", label="accuracy (sample-weighted)"),
             series("accuracy_majority", linestyle="--", color="grey", label="majority-class floor")],
            xlabel="round", ylabel="test accuracy (%)", title="Personalized accuracy", legend={},
        ),
        line_figure(
            run_dir / "density.png",
            [series("density", marker=".", label="layer-mean density"),
             series("density_weighted", label="parameter-weighted density")],
            xlabel="round", ylabel="density (kept fraction)", title="Model density (mean over clients)", ylim=(0, 1.05), legend={},
        ),
        line_figure(
            run_dir / "communication.png", [([r["round"] for r in rows], [r["bits_cum"] / GIGA for r in rows], {})],
            xlabel="round", ylabel="cumulative communication (Gbit)", title="Communication (down + up)",
        ),
    ]
    with_layers = [r for r in evaluated if r.get("density_layers")]
    if with_layers:  # SpaFL: each masked layer's density, and where the collapse guard reset thresholds
        names = list(with_layers[0]["density_layers"])
        resets = [(r["round"], r.get("guard_resets_train", 0) + r.get("guard_resets_eval", 0)) for r in rows]
        total = sum(count for _, count in resets)
        figures.append(line_figure(
            run_dir / "layers.png",
            [([r["round"] for r in with_layers], [r["density_layers"][name] for r in with_layers], {"label": name}) for name in names],
            xlabel="round", ylabel="density (kept fraction), mean over clients", ylim=(0, 1.05), legend={"fontsize": 8},
            title=f"Density per layer ({total} collapse-guard resets in all)",
        ))
    return figures


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def report(run_dirs: list[str]) -> str:
    summaries = {}
    for run_dir in run_dirs:
        rows = load_run(run_dir)
        summaries[str(run_dir)] = summarize_run(rows)
        try:
            plot_run(run_dir, rows)
        except OSError as error:
            raise file_error(error, f"cannot write the plots into {short_path(run_dir)}", run_dir) from None
    return table(summaries)


def plot_patterns(run_dir: str | Path, layer: str) -> Path:
    """Kept (dark) / pruned (light) units of ``layer``: rows = units, columns = clients, one panel per recorded round."""
    import numpy as np

    files = sorted((Path(run_dir) / "masks").glob("round_*.npz"))
    if not files:
        raise UserError(f"{run_dir} has no recorded masks; run with --set record_masks=ROUND[,ROUND...]")
    panels = []
    for path in files:
        with np.load(path) as saved:
            if layer not in saved:
                names = sorted(k for k in saved.files if not k.startswith("units/"))
                raise UserError(f"layer {layer!r} was not recorded; recorded layers: {', '.join(names)}")
            units = int(saved[f"units/{layer}"])
            kept = np.unpackbits(saved[layer], axis=1, count=units).astype(bool)  # [clients, units]
        panels.append((int(path.stem.split("_")[1]), kept.T))
    fig, axes = pyplot().subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (round_number, kept) in zip(axes[0], panels):
        ax.imshow(kept, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=f"round {round_number}: {kept.mean():.0%} kept", xlabel="client", ylabel=f"{layer} unit")
    fig.suptitle(f"{layer}: kept (dark) and pruned (light) units per client")
    return _save(fig, Path(run_dir) / f"patterns_{layer.replace('.', '_')}.png")
