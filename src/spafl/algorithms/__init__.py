"""Federated algorithms, one module each, all behind :class:`spafl.algorithms.base.Algorithm`.

:data:`ALGORITHMS` is the one registry of method names (``Config.method`` takes
its choices from it). The names are known without importing torch; a class
and the rest of this package's names are imported on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spafl.registry import Registry, lazy_attributes

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names are resolved by __getattr__
    from spafl.algorithms.base import Algorithm, ClientData, ClientResult, ClientTask, Message, ModelSpec, Reply, State
    from spafl.algorithms.fedavg import FedAvg
    from spafl.algorithms.fedp3 import FedP3
    from spafl.algorithms.fedpm import FedPM
    from spafl.algorithms.fedspa import FedSpa
    from spafl.algorithms.fjord import FjORD
    from spafl.algorithms.heterofl import HeteroFL
    from spafl.algorithms.local import Local
    from spafl.algorithms.lotteryfl import LotteryFL
    from spafl.algorithms.spafl import SpaFL

#: Method name -> algorithm class (each class's ``name`` is its key).
ALGORITHMS: Registry[type[Algorithm]] = Registry({
    "spafl": "spafl.algorithms.spafl:SpaFL",
    "fedavg": "spafl.algorithms.fedavg:FedAvg",
    "local": "spafl.algorithms.local:Local",
    # the sparse baselines of the paper's comparison, in its order
    "fedpm": "spafl.algorithms.fedpm:FedPM",
    "heterofl": "spafl.algorithms.heterofl:HeteroFL",
    "fjord": "spafl.algorithms.fjord:FjORD",
    "fedp3": "spafl.algorithms.fedp3:FedP3",
    "fedspa": "spafl.algorithms.fedspa:FedSpa",
    "lotteryfl": "spafl.algorithms.lotteryfl:LotteryFL",
})

# public name -> module that defines it
_LAZY = {
    **{name: "spafl.algorithms.base" for name in (
        "Algorithm", "ClientData", "ClientResult", "ClientTask", "Message", "ModelSpec", "Reply", "State",
    )},
    "FedAvg": "spafl.algorithms.fedavg",
    "Local": "spafl.algorithms.local",
    "FedP3": "spafl.algorithms.fedp3",
    "LotteryFL": "spafl.algorithms.lotteryfl",
    "FedPM": "spafl.algorithms.fedpm",
    "FedSpa": "spafl.algorithms.fedspa",
    "HeteroFL": "spafl.algorithms.heterofl",
    "FjORD": "spafl.algorithms.fjord",
    "SpaFL": "spafl.algorithms.spafl",
}

__all__ = [
    "ALGORITHMS", "Algorithm", "ClientData", "ClientResult", "ClientTask", "FedAvg", "Local", "Message", "ModelSpec",
    "Reply", "SpaFL", "State",
]
__all__ += ["FedPM", "FedSpa"]
__all__ += ["FjORD", "HeteroFL"]
__all__ += ["FedP3", "LotteryFL"]


__getattr__, __dir__ = lazy_attributes("spafl.algorithms", _LAZY, globals(), __all__)
