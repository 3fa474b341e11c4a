"""Hostile input and faults: one line on stderr, exit code 2 (130 for Ctrl-C), and nothing of the run is lost.

Every test checks the message, the exit code, and that the run directory
(when there is one) is as it was, or resumes to the rows an unbroken run has.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import spafl.engine.checkpoint as checkpoint_module
from spafl.cli import main
from spafl.data import fmnist
from spafl.errors import UserError
from spafl.runtime.record import MetricsFile, rows_through
from tests.data.fakes import write_fake_fmnist
from tests.helpers import fails

SMALL = ["--set", "dataset=synthetic", "--set", "num_clients=3", "--set", "clients_per_round=2", "--set", "rounds=2",
         "--set", "local_epochs=1", "--set", "threads=1", "--set", "workers=1", "--set", "checkpoint_every=1", "--quiet"]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> content)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def rounds_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def edit_config(run_dir: Path, **changes) -> None:
    path = run_dir / "config.json"
    saved = json.loads(path.read_text())
    saved["config"].update(changes)
    path.write_text(json.dumps(saved))


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """Two finished 2-round runs (checkpoint every round): client states in memory, and on disk."""
    base = tmp_path_factory.mktemp("finished")
    for store in ("memory", "disk"):
        assert main(["run", "--preset", "fmnist-paper", "--out", str(base / store), *SMALL, "--set", f"client_store={store}"]) == 0
    return base


@pytest.fixture
def run(finished_runs, tmp_path, capsys):
    """A copy of the finished memory-store run."""
    capsys.readouterr()
    shutil.copytree(finished_runs / "memory", tmp_path / "r")
    return tmp_path / "r"


@pytest.fixture
def disk_run(finished_runs, tmp_path, capsys):
    """A copy of the finished disk-store run."""
    capsys.readouterr()
    shutil.copytree(finished_runs / "disk", tmp_path / "r")
    return tmp_path / "r"


# -- 4: a resume compares config.json with the checkpoint's config ----------------------------------
@pytest.mark.parametrize("changes, named", [
    ({"num_clients": 4}, ["num_clients (3 -> 4)"]),
    ({"lr": 0.002}, ["lr (0.001 -> 0.002)"]),
    ({"method": "fedavg"}, ["method ('spafl' -> 'fedavg')"]),
    ({"dataset": "fmnist", "data_dir": "FAKE"}, ["dataset ('synthetic' -> 'fmnist')", "data_dir"]),
])
def test_resume_refuses_a_config_edited_since_the_checkpoint(capsys, run, tmp_path, changes, named):
    if changes.get("data_dir") == "FAKE":
        changes = {**changes, "data_dir": str(write_fake_fmnist(tmp_path / "fmnist", 60, 20))}
    edit_config(run, **changes)
    before = snapshot(run)
    fails(capsys, ["run", "--resume", str(run)], "config.json differs from the run's checkpoint", *named, "only rounds may change")
    assert snapshot(run) == before


def test_resume_may_extend_rounds_and_says_so_in_help(capsys, run):
    edit_config(run, rounds=3)
    assert main(["run", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert rounds_of(run) == [0, 1, 2, 3]
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "except rounds, which may be raised" in " ".join(capsys.readouterr().out.split())


# -- 5: rows and checkpoint stay consistent; lost rows are noticed ------------------------------------
def _garbage_middle(path):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{garbage\n" + "".join(lines[2:]))


def _cut_last(path):
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize("damage, fragments", [
    (_garbage_middle, ["line 2: not JSON, so round 1 is lost"]),
    (_cut_last, ["line 3: not JSON, so round 2 is lost"]),
    (lambda path: path.unlink(), ["metrics.jsonl is missing"]),
    (lambda path: path.write_text("".join(path.read_text().splitlines(keepends=True)[:1])), ["holds rounds 0..0, so rounds 1..2 are lost"]),
])
def test_resume_refuses_rows_lost_before_the_checkpoint_and_changes_nothing(capsys, run, damage, fragments):
    damage(run / "metrics.jsonl")
    before = snapshot(run)
    fails(capsys, ["run", "--resume", str(run)], *fragments, "the checkpoint is at round 2", "cannot be recomputed")
    assert snapshot(run) == before


def test_a_line_cut_after_the_checkpoint_is_normal_and_resumes(capsys, run):
    whole = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 3, "evaluated": tr')  # a crash in the middle of a later round's row
    assert main(["run", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == whole


def test_a_checkpoint_beyond_the_runs_rounds_is_refused(capsys, run):
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    saved["round"] = 99
    torch.save(saved, run / "checkpoint.pt")
    before = snapshot(run)
    fails(capsys, ["run", "--resume", str(run)], "is at round 99, but the run has 2 rounds")
    assert snapshot(run) == before


# -- 6: SIGINT ignored at start ----------------------------------------------------------------------
def test_run_started_with_sigint_ignored_stops_on_sigint_and_resumes(tmp_path):
    out = tmp_path / "r"
    settings = [*SMALL, "--set", "rounds=40"]
    # as a background job of a script starts it: SIGINT ignored, which the exec'ed `spafl run` inherits
    ignoring = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.executable, sys.argv[1:])"
    process = subprocess.Popen(
        [sys.executable, "-c", ignoring, sys.executable, "-m", "spafl.cli", "run", "--preset", "fmnist-paper", "--out", str(out), *settings],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"continue with `spafl run --resume {out}`" in err and "Traceback" not in err
    done = torch.load(out / "checkpoint.pt", weights_only=True)["round"]
    assert 2 <= done < 40
    assert [row["round"] for row in rows_through(metrics, done)] == list(range(done + 1))
    edit_config(out, rounds=done + 1)  # finish it sooner: rounds may change on resume
    resumed = subprocess.run([sys.executable, "-m", "spafl.cli", "run", "--resume", str(out)], capture_output=True, text=True, timeout=240, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert rounds_of(out) == list(range(done + 2))


def test_compare_started_with_sigint_ignored_takes_ctrl_c_again(capsys, tmp_path, monkeypatch):
    import spafl.compare

    seen = []

    def interrupted(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a run

    monkeypatch.setattr(spafl.compare, "compare", interrupted)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fails(capsys, ["compare", "--methods", "spafl", "--out", str(tmp_path / "c"), *SMALL],
              "interrupted; run the same command again to resume", code=130)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.default_int_handler]


# -- 7: tracebacks that were user errors -----------------------------------------------------------------
def test_unreadable_config_files(capsys, tmp_path):
    out = tmp_path / "r"
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"rounds = 3\n\xff\xfe = 1\n")
    fails(capsys, ["run", "--config", str(binary), "--out", str(out)], "is not UTF-8 text")
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 20000 + "]" * 20000 + "\n")
    fails(capsys, ["run", "--config", str(deep), "--out", str(out)], "nests arrays or tables too deeply")
    fails(capsys, ["run", "--config", "/dev/zero", "--out", str(out)], "config file /dev/zero is larger than 1 MiB")
    assert not out.exists()


def test_num_clients_beyond_the_training_samples_is_refused_before_any_allocation(capsys, tmp_path):
    out = tmp_path / "r"
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", str(out), "--set", "dataset=synthetic",
                   "--set", "num_clients=1000000000", "--quiet"], "num_clients=1000000000 exceeds the 2000 training samples")
    assert not out.exists()


@pytest.mark.parametrize("where, fragments", [
    ("x" * 5000, ["the path is too long", "(5000 characters)"]),
    ("plain/run", ["plain is a file, not a directory"]),
    ("/proc/spafl-test/run", ["the file system of /proc does not allow it"]),
    ("/sys/spafl-test", ["cannot write to --out /sys/spafl-test"]),
])
def test_an_out_dir_that_cannot_be_written(capsys, tmp_path, monkeypatch, where, fragments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").write_text("a regular file")
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", where, *SMALL], *fragments)
    assert [p.name for p in tmp_path.iterdir()] == ["plain"]


@pytest.mark.parametrize("where, fragments", [
    ("d" * 5000, ["cannot use data dir", "the path is too long"]),
    ("plain/data", ["cannot use data dir plain/data", "a part of the path is a file"]),
    ("/proc/spafl-test", ["data dir /proc/spafl-test does not exist"]),
])
def test_a_data_dir_that_cannot_be_used(capsys, tmp_path, monkeypatch, where, fragments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").write_text("a regular file")
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", "r", "--data-dir", where, "--quiet"], *fragments)
    assert [p.name for p in tmp_path.iterdir()] == ["plain"]


def test_compare_out_on_a_file(capsys, tmp_path):
    target = tmp_path / "table"
    target.write_text("mine")
    fails(capsys, ["compare", "--methods", "spafl,fedavg", "--out", str(target), *SMALL], f"{target} is a file, not a directory")
    assert target.read_text() == "mine"


def test_resume_with_a_damaged_config_json(capsys, run):
    config = run / "config.json"
    original = config.read_text()
    edit_config(run, rounds="many")
    fails(capsys, ["run", "--resume", str(run)], f"{config}: rounds must be an integer, got 'many'")
    config.write_text(json.dumps({"config": [1, 2]}))
    fails(capsys, ["run", "--resume", str(run)], "is not a spafl run config")
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    fails(capsys, ["run", "--resume", str(run)], "is unreadable or not a spafl run config")
    config.write_text(original)
    assert main(["run", "--resume", str(run)]) == 0  # nothing else was touched


def test_resume_of_a_read_only_run_dir_changes_nothing(capsys, run, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # the run directory's file system is mounted read-only
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(path).startswith(str(run)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    before = snapshot(run)
    fails(capsys, ["run", "--resume", str(run)], f"cannot write to run directory {run}", "the file system is read-only")
    assert snapshot(run) == before


def test_resume_with_a_truncated_client_file(capsys, disk_run):
    state = min((disk_run / "clients").glob("c*.pt"))
    state.write_bytes(state.read_bytes()[:100])
    edit_config(disk_run, rounds=3)  # a round more: the resume loads the client states
    fails(capsys, ["run", "--resume", str(disk_run)], str(state), "unreadable, corrupt or not a spafl client state")
    assert rounds_of(disk_run) == [0, 1, 2]


def test_resume_leaves_foreign_files_in_clients_alone(capsys, disk_run):
    (disk_run / "clients" / "notes.txt").write_text("mine")
    (disk_run / "clients" / "sub").mkdir()
    (disk_run / "clients" / "sub" / "c000001-r000001.pt").write_text("mine too")
    stale = disk_run / "clients" / "c000009-r000007.pt"  # spafl's name, written after the checkpoint: it goes
    stale.write_bytes(b"later")
    edit_config(disk_run, rounds=3)
    assert main(["run", "--resume", str(disk_run)]) == 0, capsys.readouterr().err
    assert (disk_run / "clients" / "notes.txt").read_text() == "mine"
    assert (disk_run / "clients" / "sub" / "c000001-r000001.pt").read_text() == "mine too"
    assert not stale.exists()
    assert rounds_of(disk_run) == [0, 1, 2, 3]


def test_resume_with_a_checkpoint_lacking_entries(capsys, run):
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    del saved["server"], saved["torch_rng"]
    torch.save(saved, run / "checkpoint.pt")
    before = snapshot(run)
    fails(capsys, ["run", "--resume", str(run)], "lacks server, torch_rng", "damaged or not a spafl checkpoint")
    assert snapshot(run) == before


@pytest.mark.parametrize("line, why", [
    (b"[]", "a JSON array, not a row object"),
    (b"null", "JSON null, not a row object"),
    (b"\x00\xff\xfe\x89binary", "not UTF-8 text"),
    (b'{"round": 1, "evaluated": true}', "a row lacking bits_cum"),
    (json.dumps({"round": 1, "evaluated": True, "bits_cum": "x", "flops_cum": 0, "seconds": 0, "accuracy": 1, "accuracy_std_clients": 0,
                 "accuracy_weighted": 1, "accuracy_majority": 1, "loss": 1, "density": 1, "density_weighted": 1}).encode(),
     "bits_cum is not of the right type"),
])
def test_report_on_damaged_metrics(capsys, run, line, why):
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(lines[0] + line + b"\n" + b"".join(lines[2:]))
    before = snapshot(run)
    fails(capsys, ["report", str(run)], "metrics.jsonl, line 2", why)
    assert snapshot(run) == before


def test_a_full_disk_mid_run_names_the_file_and_the_run_resumes(capsys, tmp_path, monkeypatch):
    out = tmp_path / "r"
    real_append = MetricsFile.append

    def append(self, row):
        if row["round"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "metrics.jsonl"))
        real_append(self, row)

    monkeypatch.setattr(MetricsFile, "append", append)
    fails(capsys, ["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL, "--set", "rounds=3"],
          f"cannot write the run record in {out}: the disk is full ({out / 'metrics.jsonl'})", "checkpoint of round 1")
    assert rounds_of(out) == [0, 1]
    monkeypatch.setattr(MetricsFile, "append", real_append)
    assert main(["run", "--resume", str(out)]) == 0
    assert rounds_of(out) == [0, 1, 2, 3]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    out = tmp_path / "r"
    saves = []

    def save(obj, handle):
        saves.append(obj["round"])
        if obj["round"] == 2:
            handle.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save(obj, handle)

    monkeypatch.setattr(checkpoint_module, "torch", SimpleNamespace(save=save, load=torch.load))
    fails(capsys, ["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL, "--set", "rounds=3"], "the disk is full")
    assert saves == [1, 2]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no half-written checkpoint left behind
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 1
    monkeypatch.undo()
    assert main(["run", "--resume", str(out)]) == 0
    assert rounds_of(out) == [0, 1, 2, 3]


def _idx(header_shape, payload: bytes) -> bytes:
    return gzip.compress(struct.pack(">BBBB", 0, 0, 8, len(header_shape)) + struct.pack(">" + "I" * len(header_shape), *header_shape) + payload)


@pytest.mark.parametrize("bomb, fragments", [
    # a header that promises little, data that inflates to 64 MiB
    (_idx((10, 28, 28), bytes(64 << 20)), ["decompresses to more than the 7856 bytes its IDX header announces"]),
    # a header that promises more than Fashion-MNIST has
    (_idx((4_000_000_000, 28, 28), bytes(1000)), ["announces shape (4000000000, 28, 28), more than", "(at most (60000, 28, 28))"]),
])
def test_a_gzip_bomb_as_an_idx_file_is_refused_without_inflating_it(capsys, tmp_path, bomb, fragments):
    data = write_fake_fmnist(tmp_path / "data", 60, 20)
    (data / fmnist.TRAIN_IMAGES).write_bytes(bomb)
    fails(capsys, ["run", "--preset", "fmnist-quick", "--out", str(tmp_path / "r"), "--data-dir", str(data), "--quiet"],
          fmnist.TRAIN_IMAGES, *fragments)
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="IDX header"):
        fmnist.verify_file(data / fmnist.TRAIN_IMAGES)


# -- 8: smaller ones ------------------------------------------------------------------------------------------
def test_non_finite_numbers_are_refused_in_every_option(capsys, tmp_path):
    out = str(tmp_path / "c")
    fails(capsys, ["compare", "--methods", "spafl:lr=nan", "--out", out, *SMALL], "lr must be a finite number; got nan")
    fails(capsys, ["compare", "--methods", "spafl", "--out", out, *SMALL, "--set", "th_coeff=inf"], "th_coeff must be a finite number")
    fails(capsys, ["compare", "--methods", "spafl", "--seeds", "nan", "--out", out, *SMALL], "--seeds must be comma-separated integers")
    fails(capsys, ["run", "--out", out, *SMALL, "--set", "rounds=1e999"], "rounds must be an integer")
    fails(capsys, ["deploy-local", "--nodes", "2", "--out", out, "--timeout", "nan"], "expected a finite number of seconds > 0")
    fails(capsys, ["deploy-local", "--nodes", "2", "--out", out, "--round-timeout", "inf"], "expected a finite number of seconds > 0")
    assert not (tmp_path / "c").exists()


def test_a_failed_download_leaves_no_empty_folder(capsys, tmp_path, monkeypatch):
    import spafl.data.locate as locate_module

    def offline(url, dest, timeout):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(locate_module, "download_file", offline)
    assert main(["fetch-data", "fmnist", "--data-dir", str(tmp_path / "new" / "data")]) == 2
    progress, error = capsys.readouterr().err.strip().splitlines()  # "downloading URL -> FILE", then the error
    assert progress.startswith("spafl: downloading") and error.startswith("spafl: error: fmnist files not in")
    assert "the download from" in error and "failed (network disabled in tests)" in error
    assert list(tmp_path.iterdir()) == []


# -- clients without training data ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["spafl", "fedavg"])
def test_clients_without_training_data_are_skipped_and_every_row_is_written(capsys, tmp_path, method):
    from spafl.config import build_config
    from spafl.data import synthetic_dataset
    from spafl.runtime.federation import split

    settings = ["--set", "dataset=synthetic", "--set", "alpha=0.01", "--set", "rounds=3", "--set", f"method={method}"]
    config = build_config("fmnist-quick", overrides=dict(s.split("=", 1) for s in settings[1::2]))
    assert 0 in split(config, synthetic_dataset()).train_sizes()  # some client holds no training sample
    out = tmp_path / "r"
    assert main(["run", "--preset", "fmnist-quick", *settings, "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert rounds_of(out) == [0, 1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3


def test_fedavg_gives_a_client_without_samples_weight_zero():
    from spafl.algorithms import ALGORITHMS
    from spafl.algorithms.base import Reply, pack
    from spafl.algorithms.dense import WEIGHTS
    from spafl.config import build_config
    from spafl.runtime.federation import server_spec

    config = build_config("fmnist-quick", overrides={"dataset": "synthetic", "method": "fedavg"})
    spec = server_spec(config)
    fedavg = ALGORITHMS["fedavg"](config, spec)
    server = fedavg.init_server(spec.initial_state(0))
    names = fedavg.weight_names
    trained = pack(WEIGHTS, {name: torch.ones_like(server["model"][name]) for name in names})
    untrained = pack(WEIGHTS, {name: torch.full_like(server["model"][name], 100.0) for name in names})
    merged = fedavg.aggregate(server, [Reply(0, trained, 7), Reply(1, untrained, 0)], 0)
    for name in names:
        assert torch.equal(merged["model"][name], torch.ones_like(server["model"][name])), name
