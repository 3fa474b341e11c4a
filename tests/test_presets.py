"""Every preset runs: CIFAR ones on generated files in the official format, FMNIST end to end on the real data."""

import json
import pytest
import torch

from spafl.cli import main
from spafl.config import build_config
from spafl.data import Dataset, load_dataset
from spafl.data.partition import make_partition
from spafl.engine import Simulator
from spafl.runtime.federation import build_federation
from spafl.errors import UserError
from spafl.seeding import derive_seed

from tests.data.fakes import write_fake_cifar



def real_fmnist():
    """Fashion-MNIST wherever `make setup` put it (same search as the CLI, no download)."""
    try:
        return load_dataset("fmnist", None, download=False)
    except UserError as error:
        pytest.skip(f"Fashion-MNIST not available: {error}")


@pytest.mark.parametrize(
    "preset,which,model",
    [("cifar10-paper", "cifar10", "conv4"), ("cifar10-vit-paper", "cifar10", "vit"), ("cifar100-paper", "cifar100", "resnet18")],
)
def test_cifar_presets_run_one_tiny_round_on_official_format_files(tmp_path, preset, which, model):
    write_fake_cifar(tmp_path / "data", which, num_train=240, num_test=60, seed=1)
    out = tmp_path / "run"
    argv = ["run", "--preset", preset, "--out", str(out), "--data-dir", str(tmp_path / "data"), "--quiet",
            "--set", "num_clients=3", "--set", "clients_per_round=2", "--set", "rounds=1", "--set", "local_epochs=1",
            "--set", "threads=1", "--set", "min_client_samples=16", "--set", "batch_size=16"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["model"] == model and config["dataset"] == which and config["ste"] == "outside_unit"
    assert config["importance_update"] == "all_after_aggregation" and config["optimizer_scope"] == "per_round"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    thresholds = {"conv4": 650, "vit": 12_288, "resnet18": 2_400}[model]
    # up: 2 clients x thresholds; down: 2 x thresholds + delta broadcast to all 3 clients
    assert rows[1]["bits_up"] == 2 * thresholds * 32
    assert rows[1]["bits_down"] == (2 + 3) * thresholds * 32
    assert 0 <= rows[1]["accuracy"] <= 100
    if model == "vit":  # every masked linear is applied at 65 tokens; the threshold term (under 1 %) is counted once
        assert 64.0 < rows[1]["flops_true_cum"] / rows[1]["flops_cum"] < 65.0
    else:  # each masked layer computes once per position it counts: the two counts agree
        assert rows[1]["flops_true_cum"] == rows[1]["flops_cum"] > 0


def test_paper_presets_hold_the_reference_settings():
    fmnist = build_config("fmnist-paper")
    assert (fmnist.num_clients, fmnist.clients_per_round, fmnist.alpha, fmnist.rounds, fmnist.local_epochs) == (100, 10, 0.2, 500, 5)
    assert (fmnist.batch_size, fmnist.lr, fmnist.th_coeff, fmnist.grad_clip, fmnist.min_client_samples) == (64, 0.001, 0.002, 0.0, 0)
    assert (fmnist.ste, fmnist.importance_update, fmnist.optimizer_scope, fmnist.pixels) == ("identity", "before_training", "persistent", "raw")
    cifar100 = build_config("cifar100-paper")
    assert (cifar100.rounds, cifar100.local_epochs, cifar100.batch_size, cifar100.lr_decay, cifar100.lr_min) == (1500, 7, 64, 0.993, 1e-4)
    assert (cifar100.th_coeff, cifar100.grad_clip, cifar100.min_client_samples, cifar100.alpha) == (0.0007, 15.0, 10, 0.1)
    # main/cifar100's client scales th_coeff by 1/(1+exp(5-10t/penalty_scheduler)), penalty_scheduler 1 by default
    assert (cifar100.partition, cifar100.th_coeff_warmup) == ("dirichlet_capped", 1.0)
    vit = build_config("cifar10-vit-paper")
    assert (vit.model, vit.local_epochs, vit.th_coeff, vit.batch_size, vit.min_client_samples) == ("vit", 1, 0.0001, 16, 16)


def test_cifar100_preset_federation_holds_the_capped_split(tmp_path):
    """The federation of cifar100-paper is the split make_partition("dirichlet_capped") makes, test sets included."""
    write_fake_cifar(tmp_path, "cifar100", num_train=400, num_test=300, seed=3)
    config = build_config("cifar100-paper", overrides={"num_clients": 4, "clients_per_round": 2, "data_dir": str(tmp_path)})
    federation = build_federation(config)
    data = federation.dataset
    want = make_partition("dirichlet_capped", data.train_y, data.test_y, 4, 0.1, derive_seed(config.seed, "partition"), 10)
    assert federation.partition.train_sizes() == want.train_sizes()
    assert all(torch.equal(a, b) for a, b in zip(federation.partition.test, want.test))
    assert all(torch.equal(client.test_y, data.test_y[t]) for client, t in zip(federation.clients, want.test))


@pytest.mark.slow
def test_end_to_end_on_real_fashion_mnist_beats_the_majority_floor_by_20_points(tmp_path):
    full = real_fmnist()
    # A fifth of the real data keeps this test short; every client trains every round.
    subset = Dataset(name="fmnist", train_x=full.train_x[:12000], train_y=full.train_y[:12000],
                     test_x=full.test_x[:2000], test_y=full.test_y[:2000], num_classes=10,
                     source=full.source, checksums=full.checksums)
    config = build_config("fmnist-paper", overrides={
        "num_clients": 10, "clients_per_round": 10, "rounds": 3, "local_epochs": 1, "eval_every": 3, "threads": 2,
    })
    summary = Simulator(config, tmp_path / "run", federation=build_federation(config, subset), progress=False).run()
    final = summary["final"]
    assert final["accuracy"] >= final["accuracy_majority"] + 20, final
    assert summary["bits_total"] == 3 * (10 * 580 * 32 + 2 * 10 * 580 * 32)
    assert torch.isfinite(torch.tensor(final["loss"]))


def test_a_presets_method_settings_apply_to_that_method_under_the_file_and_set(tmp_path, monkeypatch):
    from spafl import config as config_module

    # the sweep's choice (docs/results.md)
    assert build_config("fmnist-paper", overrides={"method": "heterofl"}).lr == 0.0003
    assert build_config("fmnist-paper", overrides={"method": "lotteryfl"}).lr == 0.003
    assert build_config("fmnist-paper", overrides={"method": "fedpm"}).fedpm_lr == 0.3
    assert build_config("fmnist-quick", overrides={"method": "fedpm"}).fedpm_lr == 0.1
    assert build_config("fmnist-paper", overrides={"method": "fjord"}).lr == 0.001

    monkeypatch.setitem(config_module.METHOD_SETTINGS, "fmnist-paper", {"fedavg": {"lr": 0.003}})
    assert build_config("fmnist-paper", overrides={"method": "fedavg"}).lr == 0.003
    assert build_config("fmnist-paper", overrides={"method": "spafl"}).lr == 0.001  # other methods keep the preset's
    assert build_config("fmnist-quick", overrides={"method": "fedavg"}).lr == 0.001  # other presets too
    assert build_config("fmnist-paper", overrides={"method": "fedavg", "lr": 0.01}).lr == 0.01  # --set wins
    toml = tmp_path / "c.toml"
    toml.write_text('method = "fedavg"\n')
    assert build_config("fmnist-paper", toml).lr == 0.003  # the method may come from the file
    toml.write_text('method = "fedavg"\nlr = 0.02\n')
    assert build_config("fmnist-paper", toml).lr == 0.02
