"""Every CLI error path: one line on stderr, exit code 2, nothing a user ran is lost."""

import json


from spafl.cli import main
from tests.helpers import fails

SMALL = ["--set", "dataset=synthetic", "--set", "num_clients=3", "--set", "clients_per_round=2", "--set", "rounds=1",
         "--set", "local_epochs=1", "--set", "threads=1", "--quiet"]


def test_unknown_key_names_close_matches(capsys, tmp_path):
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", str(tmp_path / "r"), "--set", "th_coef=0.1"],
          "unknown config key 'th_coef'", "th_coeff")


def test_wrong_type_and_out_of_range_and_bad_choice(capsys, tmp_path):
    out = str(tmp_path / "r")
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", out, "--set", "rounds=many"], "rounds must be an integer")
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", out, "--set", "lr=-1"], "lr must be > 0")
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", out, "--set", "momentum=2"], "momentum must be <= 1")
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", out, "--set", "ste=magic"],
          "ste must be one of identity, outside_unit, long_tailed")
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", out, "--set", "clients_per_round=50"], "clients_per_round (50)")
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", out, "--set", "rounds"], "--set expects key=value")
    assert not (tmp_path / "r").exists()


def test_unknown_preset_lists_presets(capsys, tmp_path):
    fails(capsys, ["run", "--preset", "fmnist-fast", "--out", str(tmp_path / "r")], "unknown preset 'fmnist-fast'", "fmnist-quick", "cifar100-paper")


def test_missing_and_unparsable_config_files(capsys, tmp_path):
    fails(capsys, ["run", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r")], "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    fails(capsys, ["run", "--config", str(bad), "--out", str(tmp_path / "r")], "is not valid TOML")
    typo = tmp_path / "typo.toml"
    typo.write_text("roundz = 3\n")
    fails(capsys, ["run", "--config", str(typo), "--out", str(tmp_path / "r")], "unknown config key 'roundz'", "rounds")


def test_missing_data_dir_is_authoritative(capsys, tmp_path):
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "empty")],
          str(tmp_path / "empty"))


def test_config_file_and_overrides_resolve_in_order(capsys, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('dataset = "synthetic"\nnum_clients = 3\nclients_per_round = 3\nrounds = 2\nlocal_epochs = 1\nlr = 0.002\n')
    out = tmp_path / "r"
    assert main(["run", "--preset", "fmnist-paper", "--config", str(toml), "--out", str(out), "--set", "rounds=1", "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["rounds"] == 1 and saved["config"]["lr"] == 0.002 and saved["config"]["clients_per_round"] == 3
    assert saved["config"]["th_coeff"] == 0.002  # from the preset
    provenance = saved["provenance"]
    assert provenance["torch_version"] and provenance["threads"] >= 1 and provenance["spafl_version"]
    assert "final" in capsys.readouterr().out


def test_existing_run_is_never_overwritten(capsys, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL]) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    fails(capsys, ["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL], "already holds a run", "--resume")
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_errors(capsys, tmp_path):
    fails(capsys, ["run", "--resume", str(tmp_path / "missing")], "is not a directory")
    (tmp_path / "plain").mkdir()
    fails(capsys, ["run", "--resume", str(tmp_path / "plain")], "not a spafl run directory")
    out = tmp_path / "r"
    assert main(["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    fails(capsys, ["run", "--resume", str(out)], "corrupt")
    fails(capsys, ["run", "--resume", str(out), "--set", "rounds=3"], "--resume DIR takes no other options")


def test_resume_of_a_finished_run_changes_nothing(capsys, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", "--resume", str(out)]) == 0
    assert (out / "metrics.jsonl").read_text() == before


def test_divergence_stops_with_a_clear_message(capsys, tmp_path):
    out = tmp_path / "r"
    err = fails(capsys, ["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL, "--set", "lr=1e30"],
                "diverged", "last good checkpoint", code=1)
    assert "nan" in err or "inf" in err
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["round"] == 0


def test_usage_errors_are_one_line(capsys):
    fails(capsys, [], "required")
    fails(capsys, ["frobnicate"], "invalid choice")
    fails(capsys, ["run"], "needs --out")


def test_report_writes_plots_and_table(capsys, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "acc %" in printed and str(out)[-30:] in printed
    for name in ("accuracy.png", "density.png", "communication.png", "layers.png"):  # layers: SpaFL's per-layer density
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fails(capsys, ["report", str(tmp_path / "nothing")], "not a spafl run directory")


def test_keys_and_presets_listing(capsys):
    assert main(["keys"]) == 0
    listing = capsys.readouterr().out
    for key in ("importance_delta", "threshold_schedule", "optimizer_scope", "frozen_weights", "pixels"):
        assert key in listing
    assert main(["keys", "--method", "fedavg"]) == 0
    fedavg_keys = capsys.readouterr().out
    assert "\nlr = " in fedavg_keys and "th_coeff" not in fedavg_keys and "importance_update" not in fedavg_keys
    fails(capsys, ["keys", "--method", "fedprox"], "unknown method 'fedprox'")
    assert main(["presets"]) == 0
    assert "fmnist-quick" in capsys.readouterr().out


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`spafl presets | head -1` once head has gone: no BrokenPipeError traceback, exit 141 (128 + SIGPIPE)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes a line
    code = "import sys; from spafl.cli import main; sys.exit(main(['presets']))"
    try:
        finished = subprocess.run([sys.executable, "-c", code], stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert finished.returncode == 141
    assert finished.stderr == b""
