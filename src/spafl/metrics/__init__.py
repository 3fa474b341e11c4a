"""Measured quantities: message bits, training FLOPs, personalized accuracy and density."""

from spafl.metrics.bits import GIGA, dtype_bits, message_bits
from spafl.metrics.evaluation import ClientEval, evaluate_client, majority_correct, summarize
from spafl.metrics.flops import dense_macs_per_sample, training_flops

__all__ = [
    "GIGA", "ClientEval", "dense_macs_per_sample", "dtype_bits", "evaluate_client", "majority_correct",
    "message_bits", "summarize", "training_flops",
]
