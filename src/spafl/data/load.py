"""The one entry point that loads a dataset by name.

Kept apart from :mod:`spafl.data.datasets`, the record the loaders build, so
that no module of :mod:`spafl.data` imports one that imports it back.
"""

from __future__ import annotations

import os

from spafl.data.datasets import Dataset
from spafl.data.registry import check_name

__all__ = ["load_dataset"]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    Where the files come from is decided by :func:`spafl.data.locate.locate`:
    ``data_dir`` when given (authoritative), else ``$SPAFL_DATA``,
    ``~/.cache/spafl``, Debian's Fashion-MNIST package, and finally a verified
    download when ``download`` is true. ``"synthetic"`` needs no files.
    """
    check_name(name)
    if name == "synthetic":
        from spafl.data.synthetic import synthetic_dataset

        return synthetic_dataset()
    from spafl.data.locate import locate

    directory = locate(name, data_dir, download=download)
    if name == "fmnist":
        from spafl.data.fmnist import load_fmnist

        return load_fmnist(directory)
    from spafl.data.cifar import load_cifar

    return load_cifar(directory, name)
