"""Federated algorithms, one module each, all behind :class:`spafl.algorithms.base.Algorithm`."""

from spafl.algorithms.base import Algorithm, ClientData, ClientResult, ClientTask, Message, ModelSpec, Reply, State
from spafl.algorithms.fedavg import FedAvg
from spafl.algorithms.local import Local
from spafl.algorithms.spafl import SpaFL

ALGORITHMS: dict[str, type[Algorithm]] = {SpaFL.name: SpaFL, FedAvg.name: FedAvg, Local.name: Local}

__all__ = [
    "ALGORITHMS", "Algorithm", "ClientData", "ClientResult", "ClientTask", "FedAvg", "Local", "Message", "ModelSpec",
    "Reply", "SpaFL", "State",
]
