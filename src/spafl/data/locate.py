"""Where dataset files come from.

Precedence (first match wins):

1. ``data_dir`` when given — authoritative: if the files are not there, that
   is an error (no fallback, no download).
2. ``$SPAFL_DATA``
3. ``~/.cache/spafl``
4. Fashion-MNIST only: Debian's ``/usr/share/datasets/fashion-mnist``
   (package ``dataset-fashion-mnist``)
5. if ``download``: the official URL, saved into ``$SPAFL_DATA`` if set, else
   ``~/.cache/spafl``, verified by checksum, written atomically.

Everything that can be monkeypatched in tests (paths, URLs, the downloader)
is a module-level name read at call time.
"""

from __future__ import annotations

import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from spafl.data import cifar, fmnist
from spafl.data.registry import check_name
from spafl.errors import UserError, file_error, short_path

DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
DOWNLOAD_TIMEOUT_S = 20.0
ENV_VAR = "SPAFL_DATA"

HOW_TO = {
    "fmnist": (
        "apt-get install dataset-fashion-mnist, or put the four .gz files ("
        + ", ".join(fmnist.FILES)
        + ") in a directory and pass --data-dir DIR, or set SPAFL_DATA=DIR"
    ),
    "cifar10": (
        f"download {CIFAR10_URL} on a machine with network access and put {cifar.SPECS['cifar10'].tarball} "
        "(or its extracted cifar-10-batches-py/) in a directory, then pass --data-dir DIR or set SPAFL_DATA=DIR"
    ),
    "cifar100": (
        f"download {CIFAR100_URL} on a machine with network access and put {cifar.SPECS['cifar100'].tarball} "
        "(or its extracted cifar-100-python/) in a directory, then pass --data-dir DIR or set SPAFL_DATA=DIR"
    ),
}


def cache_dir() -> Path:
    return Path.home() / ".cache" / "spafl"


def env_dir() -> Path | None:
    value = os.environ.get(ENV_VAR, "")
    return Path(value).expanduser() if value else None


def find_in(name: str, directory: Path) -> Path | None:
    """The directory to hand to the reader if ``directory`` holds dataset ``name``, else None."""
    if name == "fmnist":
        return fmnist.find_dir(directory)
    return directory if cifar.resolve(directory, name) is not None else None


def expected_files(name: str) -> str:
    if name == "fmnist":
        return f"{', '.join(fmnist.FILES)} (directly or in {fmnist.SUBDIR}/)"
    return cifar.expected_files(name)


def download_file(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` (an already-created temp file). Raises OSError-like errors on failure."""
    req = urllib.request.Request(url, headers={"User-Agent": "spafl"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out, length=1 << 20)


def _download_verified(url: str, target: Path, verify) -> None:
    """Download ``url`` to ``target`` atomically: temp file in the same folder, verify, os.replace.

    Network errors propagate as OSError/HTTPException; a checksum mismatch
    deletes the temp file and raises UserError.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        print(f"spafl: downloading {url} -> {target}", file=sys.stderr)
        download_file(url, tmp, DOWNLOAD_TIMEOUT_S)
        try:
            verify(tmp)
        except UserError as e:
            raise UserError(f"download of {url} failed verification and was deleted: {e}") from None
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first (UserError if it cannot)."""
    missing = []
    for candidate in (folder, *folder.parents):
        if os.path.isdir(candidate):
            break
        missing.append(candidate)
    made = []
    try:
        for candidate in reversed(missing):
            candidate.mkdir()
            made.append(candidate)
    except OSError as error:
        _remove_empty(made)
        raise file_error(error, f"cannot create the download folder {short_path(folder)}", folder) from None
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download created, innermost first, where they are still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty (a verified file of an earlier step stays), or gone
            pass


def _download(name: str, root: Path) -> Path:
    """Download dataset ``name`` into ``root``; return the directory to hand to the reader.

    A failed download leaves no partial file, and no folder it created that stayed empty.
    """
    folder = root / fmnist.SUBDIR if name == "fmnist" else root
    made = _make_dirs(folder)
    try:
        if name == "fmnist":
            for f in fmnist.FILES:
                if not (folder / f).is_file():
                    _download_verified(FMNIST_BASE_URL + f, folder / f, lambda p, f=f: fmnist.verify_file(p, f))
            return folder
        url = CIFAR10_URL if name == "cifar10" else CIFAR100_URL
        _download_verified(url, root / cifar.SPECS[name].tarball, lambda p: cifar.verify_tarball(p, name))
        return root
    except BaseException:
        _remove_empty(made)
        raise


_NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError)


def locate(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Return the directory holding dataset ``name`` (fmnist, cifar10, cifar100), downloading it if allowed."""
    check_name(name)
    if name == "synthetic":
        raise UserError("the synthetic dataset is generated in memory; it has no files to locate or fetch")
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        try:
            os.stat(d)
        except FileNotFoundError:
            raise UserError(f"data dir {short_path(d)} does not exist; it should hold the {name} files: {expected_files(name)}") from None
        except OSError as error:
            raise file_error(error, f"cannot use data dir {short_path(d)}", d) from None
        if not d.is_dir():
            raise UserError(f"data dir {short_path(d)} is not a directory; it should hold the {name} files: {expected_files(name)}")
        found = find_in(name, d)
        if found is None:
            raise UserError(f"{name} files not found in data dir {d}; expected {expected_files(name)}")
        return found

    tried: list[str] = ["--data-dir (not given)"]
    env = env_dir()
    candidates: list[tuple[str, Path | None]] = [(f"${ENV_VAR}=", env), ("", cache_dir())]
    if name == "fmnist":
        candidates.append(("", Path(DEBIAN_FMNIST_DIR)))
    for label, d in candidates:
        if d is None:
            tried.append(f"${ENV_VAR} (not set)")
            continue
        found = find_in(name, d) if os.path.isdir(d) else None
        if found is not None:
            return found
        what = "no such directory" if not os.path.isdir(d) else "files not there"
        tried.append(f"{label}{d} ({what})")

    if download:
        root = env if env is not None else cache_dir()
        url = FMNIST_BASE_URL if name == "fmnist" else (CIFAR10_URL if name == "cifar10" else CIFAR100_URL)
        try:
            return _download(name, root)
        except _NETWORK_ERRORS as e:
            reason = getattr(e, "reason", None) or e
            tried.append(f"download from {url} into {root} (failed: {reason})")
    else:
        tried.append("download (disabled)")
    raise UserError(f"{name} data not found; tried: {'; '.join(tried)}. To provide it: {HOW_TO[name]}")


def fetch(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Make dataset ``name`` available locally and return the directory it is in (for ``spafl fetch-data``).

    With ``data_dir``: return it if the files are there, otherwise download
    them into it (fetching is an explicit request to obtain the data). Without:
    the :func:`locate` search, downloading when nothing is found.
    """
    check_name(name)
    if name == "synthetic":
        raise UserError("the synthetic dataset is generated in memory; there is nothing to fetch (choose fmnist, cifar10 or cifar100)")
    if data_dir is None:
        return locate(name, None, download=True)
    d = Path(data_dir).expanduser()
    if os.path.isdir(d):
        found = find_in(name, d)
        if found is not None:
            return found
    url = FMNIST_BASE_URL if name == "fmnist" else (CIFAR10_URL if name == "cifar10" else CIFAR100_URL)
    try:
        return _download(name, d)
    except _NETWORK_ERRORS as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"{name} files not in {d} and the download from {url} failed ({reason}). To provide it: {HOW_TO[name]}"
        ) from None
