"""The in-process engine: the simulator (a transport of the shared round), its worker processes, client-state store and checkpoints."""

from spafl.engine.simulator import Simulator

__all__ = ["Simulator"]
