"""`spafl compare`: one partition and sampling sequence for all methods, exact table, resumable."""

import csv
import json

import pytest

from spafl.cli import main
from spafl.compare import TABLE_HEADER, parse_method, parse_methods, parse_seeds
from spafl.errors import UserError

SMALL = ["--preset", "fmnist-paper", "--set", "dataset=synthetic", "--set", "num_clients=4", "--set", "clients_per_round=2",
         "--set", "rounds=2", "--set", "local_epochs=1", "--set", "threads=1", "--quiet"]


def test_method_override_parsing():
    spec = parse_method("spafl:importance_update=off:ste=long_tailed:th_coeff=0.01")
    assert spec.method == "spafl"
    assert dict(spec.overrides) == {"importance_update": "off", "ste": "long_tailed", "th_coeff": 0.01}
    assert spec.slug == "spafl__importance_update=off__ste=long_tailed__th_coeff=0.01"
    assert parse_method("spafl:frozen_weights=true").overrides == (("frozen_weights", True),)
    assert [s.label for s in parse_methods("spafl, spafl:th_coeff=0.1")] == ["spafl", "spafl:th_coeff=0.1"]
    for bad, message in [("spafl:bogus=1", "unknown config key 'bogus'"), ("sparse", "unknown method 'sparse'"),
                         ("spafl:th_coeff=abc", "th_coeff must be a number"), ("spafl:seed=3", "cannot be overridden"),
                         ("spafl:off", "expected name:key=value"),
                         ("fedavg:th_coeff=0.1", "fedavg does not use th_coeff"),
                         ("local:importance_update=off", "local does not use importance_update")]:
        with pytest.raises(UserError, match=message):
            parse_method(bad)
    with pytest.raises(UserError, match="twice"):
        parse_methods("spafl,spafl")
    assert parse_method("local:optimizer_scope=per_round").overrides == (("optimizer_scope", "per_round"),)
    assert parse_method("fedavg:lr=0.05").overrides == (("lr", 0.05),)
    assert parse_seeds("1,2,3") == [1, 2, 3]
    with pytest.raises(UserError, match="distinct"):
        parse_seeds("1,1")


def test_unknown_override_key_exits_2_and_runs_nothing(capsys, tmp_path):
    assert main(["compare", "--methods", "spafl:importance_updat=off", "--out", str(tmp_path / "c"), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean importance_update" in err
    assert not (tmp_path / "c").exists()


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_compare_table_sampling_resume_and_figures(capsys, tmp_path):
    out = tmp_path / "c"
    methods = "spafl,fedavg,local,spafl:th_coeff=0.5"
    assert main(["compare", "--methods", methods, "--out", str(out), "--seeds", "0,1", *SMALL]) == 0
    with open(out / "table.csv") as handle:
        table = list(csv.reader(handle))
    assert table[0] == TABLE_HEADER
    assert [row[0] for row in table[1:]] == ["spafl", "fedavg", "local", "spafl:th_coeff=0.5"]
    for row in table[1:]:
        assert row[1] == "2"
        assert all(cell == "" or float(cell) == float(cell) for cell in row[2:])  # numbers only
    by_method = {row[0]: dict(zip(TABLE_HEADER, row)) for row in table[1:]}
    assert float(by_method["local"]["gbit_total"]) == 0.0
    assert float(by_method["fedavg"]["gbit_total"]) == pytest.approx(2 * 2 * 2 * 430_500 * 32 / 1e9)
    assert float(by_method["spafl"]["gbit_total"]) == pytest.approx(2 * 2 * 3 * 580 * 32 / 1e9)
    for seed in (0, 1):
        sequences = {label: [r["sampled"] for r in read_rows(out / slug / f"seed{seed}")]
                     for label, slug in [("spafl", "spafl"), ("fedavg", "fedavg"), ("local", "local")]}
        assert sequences["spafl"] == sequences["fedavg"] == sequences["local"]
    assert read_rows(out / "spafl" / "seed0")[1]["sampled"] != read_rows(out / "spafl" / "seed1")[1]["sampled"] or \
        read_rows(out / "spafl" / "seed0")[2]["sampled"] != read_rows(out / "spafl" / "seed1")[2]["sampled"]
    for name in ("accuracy.png", "communication.png", "density.png", "tradeoff.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    lines = {line.split(" | ")[0][2:]: line.split(" | ") for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")}
    assert lines["Method"][7:10] == ["Comm. (Gbit)", "Up (Gbit)", "Down (Gbit)"]
    assert lines["spafl"][7:10] == ["0.0002227", "7.424e-05", "0.0001485"]  # 2 rounds, 2 clients, 580 thresholds, 32 bits; τ and Δτ down
    floors = [json.loads((out / "fedavg" / f"seed{seed}" / "summary.json").read_text())["final"]["accuracy_majority"] for seed in (0, 1)]
    assert floors[0] != floors[1]  # each seed's partition has its own floor; the footnote gives each
    assert (out / "table.md").read_text().splitlines()[-1] == (
        "Majority-class floor (each client always answers its most frequent training class): "
        f"{floors[0]:.2f} % (seed 0), {floors[1]:.2f} % (seed 1).")
    capsys.readouterr()

    # Rerunning skips what is finished and recomputes the same table.
    before = (out / "table.csv").read_text()
    assert main(["compare", "--methods", methods, "--out", str(out), "--seeds", "0,1", *SMALL]) == 0
    assert capsys.readouterr().err.count("finished earlier, skipped") == 8
    assert (out / "table.csv").read_text() == before
    # The same directory with other settings is refused rather than mixed.
    assert main(["compare", "--methods", "spafl", "--out", str(out), "--seeds", "0", *SMALL, "--set", "lr=0.01"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err

    # --from: the same table from the three files each run keeps (no checkpoint), nothing trained.
    kept = tmp_path / "kept"
    for run_dir in out.glob("*/seed*"):
        (kept / run_dir.parent.name / run_dir.name).mkdir(parents=True)
        for name in ("config.json", "metrics.jsonl", "summary.json"):
            (kept / run_dir.parent.name / run_dir.name / name).write_bytes((run_dir / name).read_bytes())
    assert main(["compare", "--from", str(kept)]) == 0
    redrawn = (kept / "table.csv").read_text().splitlines()
    assert sorted(redrawn) == sorted(before.splitlines())  # the same rows: every method found
    assert [line.split(",")[0] for line in redrawn[1:]] == ["spafl", "spafl:th_coeff=0.5", "fedavg", "local"]  # registry order
    assert "fmnist-paper, 2 rounds: seed(s) 0, 1" in (kept / "table.md").read_text() and (kept / "tradeoff.png").exists()
    assert not (kept / "sweep.png").exists()  # one value of th_coeff beside the default: nothing swept
    assert main(["compare", "--from", str(kept), "--methods", "local,spafl"]) == 0
    assert [line.split(",")[0] for line in (kept / "table.csv").read_text().splitlines()[1:]] == ["local", "spafl"]
    assert not list(kept.glob("*/seed*/checkpoint.pt"))
    capsys.readouterr()
    assert main(["compare", "--from", str(kept), "--methods", "fedpm"]) == 2
    assert capsys.readouterr().err.strip() == f"spafl: error: --from {kept}: fedpm has no finished run (fedpm/seed<S>/summary.json)"
    assert main(["compare", "--from", str(kept), "--out", str(out)]) == 2
    assert "takes only --methods; drop --out" in capsys.readouterr().err


def test_compare_resumes_an_unfinished_method(capsys, tmp_path, monkeypatch):
    argv = ["compare", "--methods", "spafl", *SMALL, "--set", "checkpoint_every=1", "--set", "rounds=3"]
    assert main([*argv, "--out", str(tmp_path / "reference")]) == 0
    from spafl.engine.simulator import Simulator

    original = Simulator.run_round

    def power_cut(self, state, round_index):
        if round_index == 2:
            raise RuntimeError("power cut")
        return original(self, state, round_index)

    monkeypatch.setattr(Simulator, "run_round", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        main([*argv, "--out", str(tmp_path / "c")])
    monkeypatch.undo()
    assert [r["round"] for r in read_rows(tmp_path / "c" / "spafl" / "seed0")] == [0, 1, 2]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    assert "resuming" in capsys.readouterr().err

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(read_rows(tmp_path / "c" / "spafl" / "seed0")) == strip(read_rows(tmp_path / "reference" / "spafl" / "seed0"))


def test_sparsity_patterns_figure(capsys, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), *SMALL, "--set", "record_masks=0,2"]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--patterns", "conv1"]) == 0
    assert (out / "patterns_conv1.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(out), "--patterns", "conv9"]) == 2
    assert "recorded layers: conv1, conv2, fc1, fc2" in capsys.readouterr().err


def test_sweep_figure_needs_two_values_of_one_key(tmp_path):
    from spafl.compare import plot_sweep

    rows = [{"method": label, "accuracy_mean": accuracy}
            for label, accuracy in [("fedavg:lr=0.01", 50.0), ("fedavg:lr=0.1", 60.0), ("spafl", 70.0), ("local:lr=0.01", 40.0)]]
    methods = parse_methods(",".join(row["method"] for row in rows))
    assert plot_sweep(methods, rows, tmp_path) == tmp_path / "sweep.png"
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_sweep(parse_methods("local:lr=0.01,spafl"), rows, tmp_path / "none") is None  # one value: nothing to draw


def test_sweep_table_gives_each_value_and_picks_the_best_final_accuracy():
    from spafl.compare import sweep_markdown

    rows = [{"method": label, "accuracy_mean": final, "accuracy_best_round": best} for label, final, best in [
        ("fedavg:lr=0.1", 60.0, 61.5), ("fedavg:lr=0.01", 50.0, 58.25), ("fedavg:lr=0.3", 60.0, 60.0),
        ("fedpm:fedpm_lr=0.1", 40.0, 40.0), ("fedpm:fedpm_lr=0.3", 45.125, 47.0), ("spafl", 70.0, 71.0), ("local:lr=0.01", 40.0, 41.0),
    ]]
    assert sweep_markdown(parse_methods(",".join(row["method"] for row in rows)), rows).splitlines()[2:] == [
        # values in increasing order; 0.1 and 0.3 tie at 60 %: the smaller wins
        "| fedavg | lr | 0.01: 50.00 (58.25); **0.1: 60.00** (61.50); 0.3: 60.00 (60.00) | 0.1 |",
        "| fedpm | fedpm_lr | 0.1: 40.00 (40.00); **0.3: 45.12** (47.00) | 0.3 |",
    ]
    assert sweep_markdown(parse_methods("local:lr=0.01,spafl"), rows) is None
