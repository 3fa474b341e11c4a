"""Federated algorithms, one module each, all behind :class:`spafl.algorithms.base.Algorithm`."""

from spafl.algorithms.base import Algorithm, ClientData, ClientResult, ClientTask, Message, ModelSpec, Reply, State
from spafl.algorithms.spafl import SpaFL

ALGORITHMS: dict[str, type[Algorithm]] = {SpaFL.name: SpaFL}

__all__ = [
    "ALGORITHMS", "Algorithm", "ClientData", "ClientResult", "ClientTask", "Message", "ModelSpec", "Reply",
    "SpaFL", "State",
]
