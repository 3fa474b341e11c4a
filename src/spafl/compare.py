"""`spafl compare`: several methods on one partition and one client-sampling sequence per seed.

The partition depends only on the data settings and the seed, and client
sampling only on (seed, round), so every method of a seed sees the same
clients holding the same samples in the same rounds. Each method/seed gets
an ordinary run directory (``DIR/<method>/seed<S>``) that ``spafl report``
reads; rerunning the same command skips finished runs and resumes
unfinished ones. ``spafl compare --from DIR`` draws the table and the figures
again from the finished runs under DIR, training nothing (a results directory
keeps config.json, metrics.jsonl and summary.json of each run, no checkpoint).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spafl.algorithms import ALGORITHMS
from spafl.config import FIELDS, Config, build_config, coerce, config_from_dict
from spafl.runtime.record import CONFIG, METRICS, SUMMARY, check_writable_dir, read_metrics, read_run_config, write_run_config
from spafl.errors import UserError

TABLE_HEADER = [
    "method", "seeds", "accuracy_mean", "accuracy_std_clients", "accuracy_std_seeds", "accuracy_best_round",
    "density", "density_weighted", "gbit_total", "bits_up", "bits_down", "bits_up_coded", "flops_total", "seconds",
]


@dataclass(frozen=True)
class MethodSpec:
    """A method as written on the command line: ``name[:key=value[:key=value]]``."""

    label: str
    method: str
    overrides: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label.replace(":", "__"))


def parse_method(text: str) -> MethodSpec:
    name, *assignments = text.strip().split(":")
    if name not in ALGORITHMS:
        raise UserError(f"unknown method {name!r} in --methods; methods: {', '.join(ALGORITHMS)}")
    overrides = []
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise UserError(f"method {text!r}: expected name:key=value[:key=value], got {assignment!r}")
        if key in ("method", "seed"):
            raise UserError(f"method {text!r}: {key} cannot be overridden per method")
        overrides.append((key, coerce(key, value)))  # unknown keys and bad values fail here
        if key not in ALGORITHMS[name].keys():
            raise UserError(f"method {text!r}: {name} does not use {key}; `spafl keys --method {name}` lists its keys")
    return MethodSpec(label=text.strip(), method=name, overrides=tuple(overrides))


def parse_methods(text: str) -> list[MethodSpec]:
    specs = [parse_method(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise UserError("--methods needs at least one method, e.g. --methods spafl,fedavg,local")
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"--methods lists a method twice: {labels}")
    return specs


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def run_config(
    preset: str | None, config_file: str | None, overrides: dict[str, Any] | None,
    spec: MethodSpec | None = None, seed: int | None = None,
) -> Config:
    """The settings of a compare: preset, then TOML file, then the shared overrides; then ``spec``'s method
    and its own overrides, and ``seed``, where given (without them: the settings every method starts from)."""
    values = dict(overrides or {})
    if spec is not None:
        values.update(spec.overrides)
        values["method"] = spec.method
    if seed is not None:
        values["seed"] = seed
    return build_config(preset, config_file, values)


def _finished(run_dir: Path, config: Config) -> bool:
    summary = run_dir / SUMMARY
    if not summary.exists():
        return False
    rows = read_metrics(run_dir / METRICS)
    return bool(rows) and rows[-1]["round"] == config.rounds


def run_all(
    preset: str | None, methods: list[MethodSpec], out: Path, seeds: list[int] | None = None,
    overrides: dict[str, Any] | None = None, config_file: str | None = None, progress: bool = True, log=print,
) -> dict[str, dict[int, Path]]:
    """Run (or resume, or skip) every method for every seed; returns method label -> seed -> run dir."""
    from spafl.engine import Simulator
    from spafl.runtime.federation import build_federation

    seeds = seeds or [run_config(preset, config_file, overrides).seed]
    configs = {(spec, seed): run_config(preset, config_file, overrides, spec, seed) for seed in seeds for spec in methods}
    out = Path(out)
    check_writable_dir(out, "--out")  # a file, a read-only or too long path: one line, before any run
    out.mkdir(parents=True, exist_ok=True)
    datasets: dict[tuple[str, str], Any] = {}
    runs: dict[str, dict[int, Path]] = {}
    for seed in seeds:
        for spec in methods:
            config = configs[spec, seed]
            run_dir = out / spec.slug / f"seed{seed}"
            runs.setdefault(spec.label, {})[seed] = run_dir
            resume = (run_dir / CONFIG).exists()
            if resume:
                saved = config_from_dict(read_run_config(run_dir))
                if saved != config:
                    changed = [k for k in FIELDS if getattr(saved, k) != getattr(config, k)]
                    raise UserError(f"{run_dir} holds a run with other settings ({', '.join(changed)}); use another --out")
                if _finished(run_dir, config):
                    log(f"{spec.label} seed {seed}: finished earlier, skipped")
                    continue
            key = (config.dataset, config.data_dir)
            if key not in datasets:
                from spafl.data import load_dataset

                datasets[key] = load_dataset(config.dataset, config.data_dir or None)
            federation = build_federation(config, datasets[key])
            simulator = Simulator(config, run_dir, federation=federation, progress=progress)
            if not resume:
                write_run_config(run_dir, config, preset, simulator.provenance())
            log(f"{spec.label} seed {seed}: {'resuming' if resume else 'running'} into {run_dir}")
            simulator.run(resume=resume)
    return runs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _bits(values: list[int | None]) -> int | float | None:
    """Bit totals over seeds: the exact count where every seed has the same, else their mean; None where a run lacks it."""
    if any(value is None for value in values):
        return None
    return values[0] if len(set(values)) == 1 else _mean(values)


def _std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def table_rows(runs: dict[str, dict[int, Path]]) -> list[dict[str, Any]]:
    rows = []
    for label, by_seed in runs.items():
        summaries = [json.loads((run_dir / SUMMARY).read_text()) for run_dir in by_seed.values()]
        finals = [s["final"] for s in summaries]
        rows.append({
            "method": label,
            "seeds": len(summaries),
            "accuracy_mean": _mean([f["accuracy"] for f in finals]),
            "accuracy_std_clients": _mean([f["accuracy_std_clients"] for f in finals]),
            "accuracy_std_seeds": _std([f["accuracy"] for f in finals]),
            "accuracy_best_round": _mean([s["best_round"]["accuracy"] for s in summaries]),
            "density": _mean([f["density"] for f in finals]),
            "density_weighted": _mean([f["density_weighted"] for f in finals]),
            "gbit_total": _mean([s["gbit_total"] for s in summaries]),
            # exact payload bits of the run (the same for every seed where the messages do not depend on the data)
            "bits_up": _bits([s.get("bits_up_total") for s in summaries]),
            "bits_down": _bits([s.get("bits_down_total") for s in summaries]),
            "bits_up_coded": _bits([s.get("bits_up_coded_total") for s in summaries]),
            "flops_total": _mean([s["flops_total"] for s in summaries]),
            "seconds": _mean([s["seconds_total"] for s in summaries]),
            "_majority": {seed: final["accuracy_majority"] for seed, final in zip(by_seed, finals)},
        })
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TABLE_HEADER)
        for row in rows:
            writer.writerow(["" if row[key] is None else (f"{row[key]:.6g}" if isinstance(row[key], float) else row[key]) for key in TABLE_HEADER])


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| Method | Accuracy (%) | ± clients | ± seeds | Best round (%) | Density | Density (weighted) | Comm. (Gbit) | Up (Gbit) "
        "| Down (Gbit) | Training FLOPs | Time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        seeds = "" if r["accuracy_std_seeds"] is None else f"{r['accuracy_std_seeds']:.2f}"
        up, down = ("" if r[key] is None else f"{r[key] / 1e9:.4g}" for key in ("bits_up", "bits_down"))
        lines.append(
            f"| {r['method']} | {r['accuracy_mean']:.2f} | {r['accuracy_std_clients']:.2f} | {seeds} | {r['accuracy_best_round']:.2f} | "
            f"{r['density']:.3f} | {r['density_weighted']:.3f} | {r['gbit_total']:.4g} | {up} | {down} | {r['flops_total']:.3g} | "
            f"{r['seconds']:.0f} |"
        )
    floors = _floors(rows)
    floor = f"{next(iter(floors.values())):.2f} %" if len(floors) == 1 else ", ".join(
        f"{value:.2f} % (seed {seed})" for seed, value in floors.items())
    lines += [
        "",
        "Accuracy: final round, mean over clients of each client's accuracy on its own test split (± clients: its spread over "
        "clients; ± seeds: spread of the mean over seeds). Best round is labelled as such. Density: layer-mean kept fraction "
        "(weighted: kept/all masked weights). Communication: payload bits of all messages, both directions, then uplink and "
        "downlink apart. FLOPs: the reference's training count, summed over clients and divided by N.",
        "",
        f"Majority-class floor (each client always answers its most frequent training class): {floor}.",
    ]
    return "\n".join(lines) + "\n"


def _floors(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Each seed's majority-class floor: a function of the seed's partition, so the same for every method of it."""
    floors: dict[int, float] = {}
    for row in rows:
        for seed, floor in row["_majority"].items():
            floors.setdefault(seed, floor)
    return dict(sorted(floors.items()))


def _curves(runs: dict[str, dict[int, Path]]) -> dict[str, list[list[dict[str, Any]]]]:
    return {label: [read_metrics(run_dir / METRICS) for run_dir in by_seed.values()] for label, by_seed in runs.items()}


def _seed_values(per_seed: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[list[float]]]:
    """The evaluated rounds every seed has, and ``key``'s value in each seed at each of them."""
    rounds = [r["round"] for r in per_seed[0] if r["evaluated"]]
    by_round = [{r["round"]: r for r in rows} for rows in per_seed]
    xs, values = [], []
    for number in rounds:
        at = [rows[number][key] for rows in by_round if number in rows]
        if len(at) == len(by_round):
            xs.append(number)
            values.append(at)
    return xs, values


def _mean_curve(per_seed: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    xs, values = _seed_values(per_seed, key)
    return xs, [_mean(at) for at in values]


def plot(runs: dict[str, dict[int, Path]], out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    from spafl.report import line_figure

    curves = _curves(runs)
    color = {label: f"C{index % 10}" for index, label in enumerate(curves)}  # one colour per method in every figure

    def style(label: str) -> dict[str, Any]:
        return {"marker": ".", "label": label, "color": color[label]}

    def mean_lines(key: str) -> list[tuple[list[float], list[float], dict[str, Any]]]:
        return [(*_mean_curve(per_seed, key), style(label)) for label, per_seed in curves.items()]

    figure = {"size": (7, 4.5), "legend": {"fontsize": 8}}
    floors = _floors(rows)
    floor_line = (_mean(list(floors.values())), {
        "color": "grey", "linestyle": "--", "label": "majority-class floor" + (" (mean over seeds)" if len(floors) > 1 else ""),
    })
    bands = []
    for label, per_seed in curves.items():
        if len(per_seed) > 1:  # the lowest and highest seed at each round
            xs, values = _seed_values(per_seed, "accuracy")
            bands.append((xs, [min(at) for at in values], [max(at) for at in values], {"color": color[label], "alpha": 0.2}))
    title = "Learning curves" + (" (shaded: lowest to highest seed)" if bands else "")
    written = [line_figure(
        out / "accuracy.png", mean_lines("accuracy"), hline=floor_line,
        bands=bands, xlabel="round", ylabel="accuracy (%), mean over clients", title=title, **figure,
    )]

    lines, silent = [], []
    for label, per_seed in curves.items():
        evaluated = [r for r in per_seed[0] if r["evaluated"] and r["bits_cum"] > 0]
        if not evaluated:
            silent.append(label)
            continue
        _, accuracy = _mean_curve(per_seed, "accuracy")
        _, bits = _mean_curve(per_seed, "bits_cum")
        points = [(b / 1e9, a) for b, a in zip(bits, accuracy) if b > 0]
        lines.append(([p[0] for p in points], [p[1] for p in points], style(label)))
    title = "Accuracy vs communication"
    if silent:
        title += f" (no communication: {', '.join(silent)})"
    written.append(line_figure(
        out / "communication.png", lines, xscale="log", grid="both",
        xlabel="cumulative communication (Gbit, log scale)", ylabel="accuracy (%)", title=title, **figure,
    ))
    written.append(line_figure(
        out / "density.png", mean_lines("density"),
        xlabel="round", ylabel="density (layer-mean kept fraction)", title="Model density", ylim=(0, 1.05), **figure,
    ))
    return written


def plot_tradeoff(methods: list[MethodSpec], rows: list[dict[str, Any]], out: Path, th_coeff: float) -> Path | None:
    """Final accuracy vs density, one point per th_coeff (FedAvg as a reference line).

    Points are the SpaFL entries that differ only in ``th_coeff`` (plain
    ``spafl`` runs at the configured ``th_coeff``); drawn when there are at
    least two distinct values.
    """
    from spafl.report import line_figure

    points = []
    by_label = {r["method"]: r for r in rows}
    for spec in methods:
        overrides = dict(spec.overrides)
        if spec.method == "spafl" and set(overrides) <= {"th_coeff"}:
            points.append((overrides.get("th_coeff", th_coeff), by_label[spec.label]))
    if len({coeff for coeff, _ in points}) < 2:
        return None
    points.sort(key=lambda p: p[0])
    fedavg = [r for r in rows if r["method"] == "fedavg"]
    return line_figure(
        out / "tradeoff.png", [([p[1]["density"] for p in points], [p[1]["accuracy_mean"] for p in points], {"marker": "o"})],
        size=(6, 4.5), notes=[(f"th_coeff={coeff:g}", (row["density"], row["accuracy_mean"])) for coeff, row in points],
        hline=(fedavg[0]["accuracy_mean"], {"color": "grey", "linestyle": "--", "label": "FedAvg (dense)"}) if fedavg else None,
        legend={"fontsize": 8} if fedavg else None,
        xlabel="final density (layer-mean)", ylabel="final accuracy (%)", title="SpaFL: sparsity vs accuracy",
    )


def finished_runs(out: Path, methods_text: str | None = None) -> tuple[list[MethodSpec], dict[str, dict[int, Path]]]:
    """The methods and finished runs (``<method>/seed<S>/summary.json``) under ``out``: those of ``methods_text``,
    in its order, or every method found there (in registry order)."""
    if not out.is_dir():
        raise UserError(f"--from {out}: no such directory")
    if methods_text is not None:
        methods = parse_methods(methods_text)
    else:
        found = [path.name for path in out.iterdir() if path.is_dir() and any(path.glob(f"seed*/{SUMMARY}"))]
        methods = [parse_method(name.replace("__", ":")) for name in found]
        order = list(ALGORITHMS)
        methods.sort(key=lambda spec: (order.index(spec.method), spec.label))
    runs: dict[str, dict[int, Path]] = {}
    for spec in methods:
        seeds = {}
        for run_dir in (out / spec.slug).glob("seed*"):
            if run_dir.name[4:].isdigit() and (run_dir / SUMMARY).is_file():
                seeds[int(run_dir.name[4:])] = run_dir
        if not seeds:
            raise UserError(f"--from {out}: {spec.label} has no finished run ({spec.slug}/seed<S>/{SUMMARY})")
        runs[spec.label] = dict(sorted(seeds.items()))
    if not runs:
        raise UserError(f"--from {out}: no finished run (<method>/seed<S>/{SUMMARY}) under it")
    return methods, runs


def draw(out: Path, methods: list[MethodSpec], runs: dict[str, dict[int, Path]], title: str, th_coeff: float) -> list[dict[str, Any]]:
    """table.csv, table.md and the figures of ``runs`` into ``out``."""
    rows = table_rows(runs)
    write_csv(out / "table.csv", rows)
    (out / "table.md").write_text(markdown(rows, title))
    plot(runs, out, rows)
    plot_tradeoff(methods, rows, out, th_coeff)
    plot_sweep(methods, rows, out)
    sweep = sweep_markdown(methods, rows)
    if sweep is not None:
        (out / "sweep.md").write_text(sweep)
    return rows


def redraw(out: str | Path, methods_text: str | None = None) -> list[dict[str, Any]]:
    """`spafl compare --from DIR`: the table and figures again, from the finished runs under ``out`` (no training)."""
    out = Path(out)
    methods, runs = finished_runs(out, methods_text)
    first = next(iter(next(iter(runs.values())).values()))
    saved = json.loads((first / CONFIG).read_text())
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    spafl_runs = [next(iter(runs[spec.label].values())) for spec in methods if spec.method == "spafl" and not spec.overrides]
    th_coeff = config_from_dict(read_run_config(spafl_runs[0])).th_coeff if spafl_runs else 0.0
    rounds = sorted({json.loads((run_dir / SUMMARY).read_text())["rounds"] for by_seed in runs.values() for run_dir in by_seed.values()})
    title = f"{saved.get('preset') or 'custom'}, {'/'.join(map(str, rounds))} rounds: seed(s) {', '.join(map(str, seeds))}"
    return draw(out, methods, runs, title, th_coeff)


def sweep_groups(methods: list[MethodSpec], rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[float, dict[str, Any]]]]:
    """(method, key) -> [(value, table row)] in increasing value, for the entries that override exactly one
    numeric key where the method has at least two values of it (a learning-rate sweep)."""
    by_label = {r["method"]: r for r in rows}
    groups: dict[tuple[str, str], list[tuple[float, dict[str, Any]]]] = {}
    for spec in methods:
        if len(spec.overrides) == 1 and isinstance(spec.overrides[0][1], float):
            key, value = spec.overrides[0]
            groups.setdefault((spec.method, key), []).append((value, by_label[spec.label]))
    return {group: sorted(points, key=lambda point: point[0]) for group, points in groups.items() if len(points) > 1}


def plot_sweep(methods: list[MethodSpec], rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Final accuracy against the value of a swept key (log scale), one line per method and key."""
    from spafl.report import line_figure

    lines = [([value for value, _ in points], [row["accuracy_mean"] for _, row in points], {"marker": "o", "label": f"{method} ({key})"})
             for (method, key), points in sweep_groups(methods, rows).items()]
    if not lines:
        return None
    return line_figure(
        out / "sweep.png", lines, xscale="log", size=(7, 4.5), legend={"fontsize": 8},
        xlabel="value of the swept key (log scale)", ylabel="final accuracy (%)", title="Sweep: final accuracy per value",
    )


def sweep_markdown(methods: list[MethodSpec], rows: list[dict[str, Any]]) -> str | None:
    """One line per swept method and key: each value's final accuracy (best round's in brackets), the best final
    in bold, and the value it picks (ties go to the smaller value)."""
    groups = sweep_groups(methods, rows)
    if not groups:
        return None
    lines = ["| method | key | value: final accuracy % (best round %) | best final |", "|---|---|---|---|"]
    for (method, key), points in groups.items():
        chosen, _ = max(points, key=lambda point: (point[1]["accuracy_mean"], -point[0]))
        cells = [(f"**{value:g}: {row['accuracy_mean']:.2f}**" if value == chosen else f"{value:g}: {row['accuracy_mean']:.2f}")
                 + f" ({row['accuracy_best_round']:.2f})" for value, row in points]
        lines.append(f"| {method} | {key} | {'; '.join(cells)} | {chosen:g} |")
    return "\n".join(lines) + "\n"


def compare(
    preset: str | None, methods_text: str, out: str | Path, seeds_text: str | None = None,
    overrides: dict[str, Any] | None = None, config_file: str | None = None, progress: bool = True, log=print,
) -> list[dict[str, Any]]:
    """Run everything, then write table.csv, table.md and the figures into ``out``."""
    methods = parse_methods(methods_text)
    seeds = parse_seeds(seeds_text)
    out = Path(out)
    runs = run_all(preset, methods, out, seeds, overrides, config_file, progress, log)
    title = f"{preset or 'custom'}: {len(next(iter(runs.values())))} seed(s)"
    return draw(out, methods, runs, title, run_config(preset, config_file, overrides).th_coeff)
