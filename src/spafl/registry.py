"""A name -> object table whose objects are imported on first use.

The method and model registries (:data:`spafl.algorithms.ALGORITHMS`,
:data:`spafl.models.MODELS`) map names to classes whose modules import torch.
Their *names* are needed by processes that must stay light (validating a
config in ``spafl deploy-local``'s supervisor, the command line before it
picks a command), so the table knows every name up front and imports a
class only when it is looked up.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Read-only mapping ``name -> object``; each object is given as ``"module:attribute"`` and imported on lookup.

    ``name in registry``, ``list(registry)`` and ``len(registry)`` import nothing.
    """

    def __init__(self, targets: Mapping[str, str]) -> None:
        for name, target in targets.items():
            module, sep, attribute = target.partition(":")
            if not (sep and module and attribute):
                raise ValueError(f"registry entry {name!r}: expected 'module:attribute', got {target!r}")
        self._targets = dict(targets)
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> T:
        if name not in self._loaded:
            module, _, attribute = self._targets[name].partition(":")  # KeyError for an unknown name, as a dict
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"Registry({self._targets!r})"


def lazy_attributes(package: str, names: Mapping[str, str], namespace: dict[str, Any], public: list[str]):
    """``__getattr__`` and ``__dir__`` for a package whose ``names`` (name -> module) are imported on first use (PEP 562).

    ``namespace`` is the package's ``globals()``: a name, once imported, is
    kept there, so later look-ups skip ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__
