"""LotteryFL: bit-packed masks, pruning with rewinding, masked training, masked averaging, exact LeNet-5 bits,
resume, and the Flower strategy equal to the in-process run."""

import pytest
import torch

from spafl.algorithms import ALGORITHMS, ClientTask, LotteryFL, Reply
from spafl.algorithms.lotteryfl import pack_bits, unpack_bits
from spafl.engine import Simulator
from spafl.metrics import message_bits
from spafl.runtime.federation import build_federation
from spafl.runtime.record import read_metrics
from tests.helpers import small_config

from .runs import flower_rows_equal_inprocess, needs_flower, resumed_run_equals_uninterrupted
from .tiny import SPEC, tiny_data

LENET = (500, 25_000, 400_000, 5_000)  # conv1, conv2, fc1, fc2
N = sum(LENET)


def lotteryfl(**overrides):
    values = {"method": "lotteryfl", "local_epochs": 2, "batch_size": 4, "lr": 0.05, **overrides}
    return LotteryFL(small_config(**values), SPEC)


def test_masks_pack_eight_to_a_byte_and_back():
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert torch.equal(unpack_bits(packed, (3, 7)), mask)
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist() == [129, 128]


def test_a_client_above_the_start_accuracy_prunes_rewinds_and_trains_its_subnetwork():
    # momentum, weight decay and clipping must not revive a pruned weight
    algo = lotteryfl(lotteryfl_start_acc=0.0, lotteryfl_prune_percent=50, momentum=0.9, weight_decay=0.01, grad_clip=1.0)
    assert ALGORITHMS["lotteryfl"] is LotteryFL
    initial = algo.spec.initial_state(0)
    server = algo.init_server({k: v * 3 if k.endswith(".weight") else v for k, v in initial.items()})  # not the initial model
    down = algo.server_message(server, 0, 0)
    assert set(down) == {"kept/fc1.weight", "kept/fc2.weight"} and message_bits(down) == 32 * (12 + 6)
    rewound = []
    original = algo.train_masked
    algo.train_masked = lambda model, masks, data, task: rewound.append(algo.export(model)) or original(model, masks, data, task)
    result = algo.client_update(algo.init_client(0, initial), down, tiny_data(), ClientTask(0, 0, 0))
    mask = result.state["mask"]
    # half of each layer's weights pruned: those of smallest magnitude in the received (global) model
    assert {key: int(m.sum()) for key, m in mask.items()} == {"fc1.weight": 6, "fc2.weight": 3}
    for key, m in mask.items():
        received = server["model"][key].abs()
        assert float(received[m].min()) >= float(received[~m].max())
    assert torch.equal(rewound[0]["fc1.weight"], initial["fc1.weight"])  # rewound to the initial weights
    trained = algo.workspace().fc1.weight.detach()
    assert torch.all(trained[~mask["fc1.weight"]] == 0) and not torch.equal(trained[mask["fc1.weight"]], initial["fc1.weight"][mask["fc1.weight"]])
    up = result.message
    assert set(up) == {"kept/fc1.weight", "kept/fc2.weight", "mask/fc1.weight", "mask/fc2.weight"}
    assert torch.equal(up["mask/fc1.weight"], mask["fc1.weight"]) and torch.equal(up["kept/fc1.weight"], trained[mask["fc1.weight"]])
    assert message_bits(up) == 32 * (6 + 3) + (12 + 6)
    # training FLOPs at density 1 plus the accuracy check's forward pass: 3 * E * n * 18 + n * 18
    assert result.stats["flops"] == 3 * 2 * 8 * 18 + 8 * 18
    assert algo.validate_reply(server, Reply(0, up, 8)) is None
    # the server now knows the mask: the next down message carries the kept values only
    server = algo.aggregate(server, [Reply(0, up, 8)], 0)
    assert message_bits(algo.server_message(server, 0, 1)) == 32 * 9
    # evaluation: the new global model under the client's mask
    weights = algo.evaluation_state(result.state, server)
    assert torch.equal(weights["fc1.weight"], server["model"]["fc1.weight"] * mask["fc1.weight"])
    evaluation = algo.evaluate(weights, tiny_data(), 100)
    assert (evaluation.density, evaluation.density_weighted) == (0.5, 0.5)


def test_no_pruning_below_the_start_accuracy_or_at_the_target_density():
    algo = lotteryfl(lotteryfl_start_acc=1.0)
    server = algo.init_server(algo.spec.initial_state(0))
    result = algo.client_update(algo.init_client(0, None), algo.server_message(server, 0, 0), tiny_data(), ClientTask(0, 0, 0))
    assert result.state["mask"] is None and all(bool(result.message[f"mask/{k}"].all()) for k in ("fc1.weight", "fc2.weight"))
    assert algo.evaluate(algo.evaluation_state(result.state, server), tiny_data(), 100).density == 1.0
    # at density 0.5, with a target of 0.5, no further pruning
    half = {"fc1.weight": torch.arange(12).view(3, 4) % 2 == 0, "fc2.weight": torch.tensor([[True, False, True], [False, True, False]])}
    server["masks"]["0"] = {key: pack_bits(m) for key, m in half.items()}
    at_target = lotteryfl(lotteryfl_start_acc=0.0)
    down = at_target.server_message(server, 0, 0)
    assert message_bits(down) == 32 * 9
    result = at_target.client_update({"mask": half}, down, tiny_data(), ClientTask(0, 0, 0))
    assert all(torch.equal(result.state["mask"][k], half[k]) for k in half)
    # a client whose mask is not the server's copy (a lost reply) fails clearly
    with pytest.raises(ValueError, match="differs from the client's"):
        at_target.client_update({"mask": None}, down, tiny_data(), ClientTask(0, 0, 0))


def reply(client_id, fc1_mask, fc1_values, fc2_mask, fc2_values):
    return Reply(client_id, {
        "mask/fc1.weight": torch.tensor(fc1_mask), "kept/fc1.weight": torch.tensor(fc1_values),
        "mask/fc2.weight": torch.tensor(fc2_mask), "kept/fc2.weight": torch.tensor(fc2_values),
    }, num_samples=5)


def test_aggregation_averages_each_weight_over_the_masks_that_keep_it():
    algo = lotteryfl()
    server = algo.init_server(algo.spec.initial_state(0))
    old = server["model"]
    full_fc2 = [[True] * 3] * 2
    replies = [
        reply(0, [[True, True, False, False]] + [[False] * 4] * 2, [2.0, 4.0], full_fc2, [1.0] * 6),
        reply(1, [[True, False, True, False]] + [[False] * 4] * 2, [6.0, 8.0], full_fc2, [3.0] * 6),
    ]
    new = algo.aggregate(server, replies, 0)
    fc1 = new["model"]["fc1.weight"]
    assert fc1[0].tolist() == [4.0, 4.0, 8.0, pytest.approx(float(old["fc1.weight"][0, 3]))]  # (2+6)/2, 4/1, 8/1, kept by nobody
    assert torch.equal(fc1[1:], old["fc1.weight"][1:])
    assert new["model"]["fc2.weight"].eq(2.0).all() and fc1.dtype == torch.float32
    assert torch.equal(unpack_bits(new["masks"]["1"]["fc1.weight"], (3, 4)), replies[1].message["mask/fc1.weight"])
    # the next down messages carry each client's kept positions only
    assert algo.server_message(new, 0, 1)["kept/fc1.weight"].tolist() == [4.0, 4.0]
    assert algo.server_message(new, 3, 1)["kept/fc1.weight"].numel() == 12  # never replied: full mask
    # a reply whose mask keeps a weight the server knows it pruned is rejected
    grown = reply(0, [[True] * 4] * 3, [1.0] * 12, full_fc2, [1.0] * 6)
    assert "pruned" in algo.validate_reply(new, grown)
    short = reply(1, [[True] * 4] * 3, [1.0] * 11, full_fc2, [1.0] * 6)
    assert "kept values" in algo.validate_reply(server, short)
    assert algo.aggregate(server, [], 0) is server


# -- LeNet-5 on synthetic data ------------------------------------------------------------------
def simulate(tmp_path, synthetic, name="run", **overrides):
    config = small_config(method="lotteryfl", pixels="normalized", lr=0.01, lotteryfl_start_acc=0.0, **overrides)
    return Simulator(config, tmp_path / name, federation=build_federation(config, synthetic), progress=False)


def pruned_once(kept):
    return tuple(n - round(0.2 * n) for n in kept)


def test_two_rounds_count_the_bits_of_the_formula(tmp_path, synthetic, monkeypatch):
    monkeypatch.setattr(LotteryFL, "train_accuracy", lambda self, model, data: 1.0)  # every sampled client prunes
    simulate(tmp_path, synthetic).run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    kept = {k: LENET for k in range(4)}  # every client's mask, as the server knows it
    for row in rows[1:]:
        assert row["bits_down"] == sum(32 * sum(kept[k]) for k in row["sampled"])
        for k in row["sampled"]:  # 20 % of each layer
            kept[k] = pruned_once(kept[k])
        assert row["bits_up"] == sum(32 * sum(kept[k]) + N for k in row["sampled"])
    assert pruned_once(LENET) == (400, 20_000, 320_000, 4_000) and 32 * 344_400 + N == 11_451_300
    # reported density: every client's mask (the unsampled ones full), in both definitions
    assert rows[-1]["density_weighted"] == pytest.approx(sum(sum(kept[k]) / N for k in range(4)) / 4)
    assert rows[-1]["density"] == pytest.approx(sum(sum(a / b for a, b in zip(kept[k], LENET)) / 4 for k in range(4)) / 4)


def test_resume_gives_identical_metrics(tmp_path, synthetic, monkeypatch):
    resumed_run_equals_uninterrupted(tmp_path, monkeypatch, lambda name: simulate(tmp_path, synthetic, name))


@needs_flower
def test_flower_strategy_equals_the_inprocess_run(tmp_path):
    rows = flower_rows_equal_inprocess(tmp_path, "method=lotteryfl; rounds=2; eval_every=1; lotteryfl_start_acc=0")
    assert rows[2]["bits_up"] < 2 * (32 * N + N) and rows[2]["evaluated"]  # clients pruned
