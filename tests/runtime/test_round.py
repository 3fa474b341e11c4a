"""The shared round over a hand-made transport: what it sends, counts, validates, aggregates and writes."""

from __future__ import annotations

import math

import pytest
import torch

from spafl.algorithms import Algorithm
from spafl.config import build_config
from spafl.errors import DivergedError
from spafl.metrics.bits import coded_message_bits, entropy_coded_bits, message_bits
from spafl.runtime.record import read_metrics
from spafl.runtime.round import Exchange, Received, RoundLoop, Transport
from spafl.seeding import sample_clients

from ..algorithms.tiny import SPEC


class MaskMean(Algorithm):
    """Server state: a 10-element mean of the clients' 0/1 masks; down: the mean (float32), up: a bool mask."""

    name = "maskmean"
    reports_coded_bits = True

    def init_server(self, initial_model):
        return {"mean": torch.zeros(10)}

    def init_client(self, client_id, initial_model):
        return {}

    def server_message(self, server, client_id, round_index):
        return {"mean": server["mean"]}

    def client_update(self, client, message, data, task):
        raise AssertionError("the test transport answers for the clients")

    def validate_reply(self, server, reply):
        mask = reply.message.get("mask")
        return None if mask is not None and mask.dtype == torch.bool and mask.shape == (10,) else "not a 10-element bool mask"

    def aggregate(self, server, replies, round_index):
        if not replies:
            return server
        return {"mean": torch.stack([r.message["mask"].float() for r in replies]).mean(0)}

    def evaluation_state(self, client, server):
        return {}


class Scripted(Transport):
    """Replies as each test scripts them; evaluation returns fixed figures; checkpoints kept in memory."""

    def __init__(self, replies, strict=True, away=()):
        self.replies, self.away, self.saved, self.sent = replies, set(away), None, []
        self.strict_mode = strict

    @property
    def strict(self):  # the class attribute, per instance for the tests
        return self.strict_mode

    def reachable(self, client_id):
        return client_id not in self.away

    def train(self, round_index, sends, server, evaluate_after):
        self.sent.append([client_id for client_id, _ in sends])
        exchange = Exchange()
        for client_id, _ in sends:
            message, stats = self.replies(round_index, client_id)
            exchange.received.append(Received(client_id, message, stats, message_bits(message)))
        return exchange

    def broadcast(self, round_index, message):
        raise AssertionError("MaskMean has no broadcast")

    def evaluate(self, round_number, server):
        return {"accuracy": 50.0 + round_number, "density": 1.0, "density_weighted": 1.0}

    def fresh(self, state, initial_model):
        pass

    def save(self, state):
        self.saved = {**state}

    def load(self):
        return self.saved


MASK = torch.tensor([True, False, False, True, False, False, False, False, False, False])
STATS = {"steps": 2, "num_samples": 5, "train_loss": 0.5, "flops": 100.0}


def loop_over(transport, tmp_path, **overrides):
    config = build_config(overrides={"num_clients": 6, "clients_per_round": 3, "rounds": 2, "eval_every": 2, **overrides})
    return RoundLoop(config, MaskMean(config, SPEC), transport, tmp_path), config


def test_a_round_counts_a_bool_mask_as_one_bit_per_element_and_its_entropy_coded_size_beside(tmp_path):
    transport = Scripted(lambda t, k: ({"mask": MASK}, dict(STATS)))
    loop, config = loop_over(transport, tmp_path)
    summary = loop.run(lambda: {}, resume=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2] and [r["evaluated"] for r in rows] == [True, False, True]
    row = rows[1]
    assert row["sampled"] == sample_clients(config.seed, 0, 6, 3) and row["replies"] == 3
    assert row["bits_up"] == 3 * 10  # a bool counts 1 bit, not the 8 it takes in memory
    assert row["bits_down"] == 3 * 10 * 32
    # 2 ones in 10: H(0.2) * 10 + log2(10) = 7.219 + 3.322 -> 11 bits per mask
    assert entropy_coded_bits(MASK) == math.ceil(10 * -(0.2 * math.log2(0.2) + 0.8 * math.log2(0.8)) + math.log2(10)) == 11
    assert row["bits_up_coded"] == 3 * 11 == coded_message_bits({"a": MASK, "b": MASK, "c": MASK})
    assert rows[2]["bits_cum"] == 2 * (30 + 960) and rows[2]["bits_cum_coded"] == 2 * (33 + 960)
    assert row["train_loss"] == 0.5 and row["flops_cum"] == pytest.approx(3 * 100.0 / 6)
    assert summary["final"]["accuracy"] == 52.0 and summary["bits_total"] == 2 * 990
    assert torch.equal(loop.transport.saved["server"]["mean"], MASK.float())
    assert transport.saved["round"] == 2  # checkpointed at the last round


def test_invalid_replies_are_left_out_by_a_remote_transport_and_stop_an_in_process_one(tmp_path):
    def replies(t, k):
        if k == sampled[0]:
            return {"mask": MASK.float()}, dict(STATS)  # wrong dtype
        if k == sampled[1]:
            return {"mask": MASK}, {**STATS, "train_loss": math.nan}  # diverged
        return {"mask": ~MASK}, dict(STATS)

    sampled = sample_clients(0, 0, 6, 3)
    loop, _ = loop_over(Scripted(replies, strict=False), tmp_path / "remote")
    state = loop.fresh_state({})
    facts = loop.run_round(state, 0)
    assert facts["replies"] == 1 and torch.equal(state["server"]["mean"], (~MASK).float())
    assert facts["bits_up"] == 10 * 32 + 10 + 10  # every reply that came back travelled

    loop, _ = loop_over(Scripted(replies), tmp_path / "local")
    with pytest.raises(RuntimeError, match="not a 10-element bool mask"):
        loop.run_round(loop.fresh_state({}), 0)
    replies_diverged = lambda t, k: ({"mask": MASK}, {**STATS, "train_loss": math.inf})  # noqa: E731
    loop, _ = loop_over(Scripted(replies_diverged), tmp_path / "local2")
    with pytest.raises(DivergedError, match="training loss is inf; the run diverged"):
        loop.run_round(loop.fresh_state({}), 0)


def test_unreachable_clients_get_no_message_and_an_empty_round_keeps_the_server_state(tmp_path):
    sampled = sample_clients(0, 0, 6, 3)
    transport = Scripted(lambda t, k: ({"mask": MASK}, dict(STATS)), away=sampled)
    loop, _ = loop_over(transport, tmp_path)
    state = loop.fresh_state({})
    facts = loop.run_round(state, 0)
    assert transport.sent == [[]] and facts["replies"] == 0 and facts["bits_down"] == 0 and facts["train_loss"] is None
    assert torch.equal(state["server"]["mean"], torch.zeros(10))
    assert "unavailable" not in facts  # a field only transports that list it report


def test_a_resumed_run_writes_the_rows_of_an_uninterrupted_one(tmp_path):
    script = lambda t, k: ({"mask": MASK if (t + k) % 2 else ~MASK}, dict(STATS))  # noqa: E731
    whole, _ = loop_over(Scripted(script), tmp_path / "whole", rounds=4, checkpoint_every=2)
    whole.run(lambda: {}, resume=False)
    cut = Scripted(script)
    first, _ = loop_over(cut, tmp_path / "cut", rounds=4, checkpoint_every=2)
    original = first.run_round

    def stop_in_round_four(state, round_index):
        if round_index == 3:
            raise KeyboardInterrupt
        return original(state, round_index)

    with pytest.raises(KeyboardInterrupt):
        first.run(lambda: {}, resume=False, round_fn=stop_in_round_four)
    assert [r["round"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [0, 1, 2, 3]
    again, _ = loop_over(cut, tmp_path / "cut", rounds=4, checkpoint_every=2)
    again.run(lambda: {}, resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "whole" / "metrics.jsonl"))

