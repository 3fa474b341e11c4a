"""Run directories are shared: a crafted checkpoint or client file is refused without running any of its code."""

import json

import pytest
import torch

from spafl.cli import main

SMALL = ["--set", "dataset=synthetic", "--set", "num_clients=3", "--set", "clients_per_round=2", "--set", "rounds=1",
         "--set", "local_epochs=1", "--set", "threads=1", "--set", "workers=1", "--set", "checkpoint_every=1", "--quiet"]


class Trap:
    """Unpickling this creates ``marker``: what a malicious file could do with any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def resume(capsys, run_dir):
    """Exit code and stderr of ``spafl run --resume run_dir`` (an escaping exception stands in for the code)."""
    try:
        code = main(["run", "--resume", str(run_dir)])
    except Exception as error:  # the unfixed code could crash after running the payload; the marker tells
        code = error
    return code, capsys.readouterr().err.strip()


def assert_refused(code, err, *fragments):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def more_rounds(run_dir, rounds):
    """Let a finished run go on to ``rounds`` (what `--resume` then continues)."""
    config = run_dir / "config.json"
    saved = json.loads(config.read_text())
    saved["config"]["rounds"] = rounds
    config.write_text(json.dumps(saved))


def test_a_crafted_checkpoint_is_refused_without_running_code(capsys, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    marker = tmp_path / "pwned"
    torch.save(Trap(marker), out / "checkpoint.pt")
    code, err = resume(capsys, out)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert_refused(code, err, str(out / "checkpoint.pt"), "not a spafl checkpoint", "only tensors and plain values",
                   "delete it to restart")


def test_a_crafted_client_file_is_refused_without_running_code(capsys, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL, "--set", "client_store=disk"]) == 0
    capsys.readouterr()
    files = sorted((out / "clients").glob("*.pt"))
    assert files  # the run wrote client states to disk
    marker = tmp_path / "pwned"
    torch.save({"model": Trap(marker)}, files[0])
    # resuming a finished run loads no client; evaluating at the last round does: ask for one round more
    more_rounds(out, 2)
    code, err = resume(capsys, out)
    assert not marker.exists(), "loading a client file ran code from it"
    assert_refused(code, err, str(files[0]), "not a spafl client state", "only tensors and plain values",
                   "delete the run's checkpoint.pt")


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_what_spafl_saves_loads_as_plain_values_and_resumes(capsys, tmp_path, store):
    """A genuine checkpoint (pending broadcasts included) and client files load with weights_only=True; resume works."""
    out = tmp_path / "r"
    assert main(["run", "--preset", "fmnist-paper", "--out", str(out), *SMALL, "--set", f"client_store={store}",
                 "--set", "importance_update=all_after_aggregation"]) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["clients"]["log"]  # a broadcast some client has not received yet
    assert saved["torch_rng"].dtype == torch.uint8 and saved["config"]["client_store"] == store
    for path in (out / "clients").glob("*.pt"):
        torch.load(path, weights_only=True)
    more_rounds(out, 2)
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
