"""Reading a round's train replies on the server: which partition each is from, and what it says.

The round (:mod:`spafl.runtime.round`) validates what a reply's tensors and
statistics say; here is what only the Flower transport can check: that the
reply comes from the node the message went to, once, for the partition it
was meant for, with readable records and numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.common import log

from spafl.flower import records as rec
from spafl.metrics.bits import message_bits
from spafl.runtime.round import Exchange, Received


@dataclass
class Replies:
    """Train replies read into an :class:`Exchange`, with what only Flower knows."""

    exchange: Exchange = field(default_factory=Exchange)
    failed: list[tuple[int | None, str]] = field(default_factory=list)  # error replies (ClientApp raised, node lost)
    answered: set[int] = field(default_factory=set)  # partitions that sent a reply with content


def number(metrics: Mapping[str, Any], key: str, default: float, integral: bool) -> float | int:
    value = metrics.get(key, default)
    if isinstance(value, (list, tuple, bytes, str)) or isinstance(value, bool):
        raise TypeError(f"{key} is a {type(value).__name__}, not a number")
    value = float(value)
    if integral:
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{key} is {value}, not an integer")
        return int(value)
    return value


def read_replies(
    replies: Iterable[Message], partitions: Mapping[int, int], round_number: int | None = None, sizes: Mapping[int, int] | None = None,
) -> Replies:
    """Attribute every train reply to its partition and read it (the round validates what it says).

    ``partitions`` maps the node ids the messages went to onto the partition
    ids they were meant for. Rejected here, with the reason logged: a reply
    from an unexpected node, a second reply for a partition, a claim of
    another partition, missing records, numbers or arrays that cannot be
    read, more training samples than ``sizes`` allows (the partition's size
    as its node reported it when it connected). Error replies (the ClientApp raised, the node went away) are
    listed in ``failed``. Every array record that came back counts in the
    bits, accepted or not.
    """
    out = Replies()
    exchange = out.exchange
    where = f"round {round_number}: " if round_number is not None else ""
    for reply in replies:
        node_id = int(reply.metadata.src_node_id)
        partition = partitions.get(node_id)
        if reply.has_error():
            reason = f"error reply (code {reply.error.code}): {reply.error.reason}"
            out.failed.append((partition, reason))
            log(WARNING, "spafl: %snode %s (partition %s) failed: %s", where, node_id, partition, reason)
            continue

        def reject(why: str, partition: int | None = partition, node_id: int = node_id) -> None:
            exchange.rejected.append((partition, why))
            log(WARNING, "spafl: %sreply of node %s (partition %s) rejected: %s", where, node_id, partition, why)

        content = reply.content
        arrays = content.array_records.get(rec.ARRAYS)
        try:
            message = rec.from_array_record(arrays) if arrays is not None else None
            bits = message_bits(message)
        except Exception as error:  # noqa: BLE001 - malformed arrays from a node must not stop the server
            message, bits = None, rec.record_payload_bits(arrays)
            unreadable = f"arrays cannot be read ({type(error).__name__}: {error})"
        else:
            unreadable = None
        if partition is None:
            exchange.bits_up += bits
            reject("it comes from a node that was not sent a message this round")
            continue
        if partition in out.answered:
            exchange.bits_up += bits
            reject("a second reply for the same partition")
            continue
        out.answered.add(partition)
        metrics = content.metric_records.get(rec.METRICS)
        if arrays is None or metrics is None:
            exchange.bits_up += bits
            reject(f"records {sorted(content.keys())} lack {rec.ARRAYS!r} (ArrayRecord) or {rec.METRICS!r} (MetricRecord)")
            continue
        try:
            claimed = number(metrics, rec.PARTITION_ID, -1, integral=True)
            stats = {
                "steps": number(metrics, "steps", 0, integral=True),
                "num_samples": number(metrics, "num_samples", 0, integral=True),
                "train_loss": number(metrics, "train_loss", math.nan, integral=False),
                "flops": number(metrics, "flops", 0.0, integral=False),
                "flops_true": number(metrics, "flops_true", 0.0, integral=False),
                "guard_resets": number(metrics, "guard_resets", 0, integral=True),
            }
        except (TypeError, ValueError, OverflowError) as error:
            exchange.bits_up += bits
            reject(f"metrics cannot be read ({error})")
            continue
        if claimed != partition:
            exchange.bits_up += bits
            reject(f"it says partition {claimed}, the message was for partition {partition}")
            continue
        size = (sizes or {}).get(partition)
        if size is not None and stats["num_samples"] > size:
            exchange.bits_up += bits
            reject(f"it says it trained on {stats['num_samples']} samples; its node reported {size} when it connected")
            continue
        if unreadable is not None:
            exchange.bits_up += bits
            reject(unreadable)
            continue
        exchange.received.append(Received(partition, message, stats, bits))
    return out
