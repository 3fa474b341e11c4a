"""Execution engines: the in-process simulator, checkpoints, run directories."""

from spafl.engine.federation import Federation, build_federation
from spafl.engine.simulator import Simulator, summarize_run

__all__ = ["Federation", "Simulator", "build_federation", "summarize_run"]
