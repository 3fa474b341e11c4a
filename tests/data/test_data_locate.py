"""Where data comes from: precedence, errors, verified atomic downloads (never the network)."""

import gzip
import hashlib
import shutil
import urllib.error
from pathlib import Path

import pytest

from spafl.data import cifar, fetch, fmnist, load_dataset, locate
from spafl.errors import UserError

from tests.data.fakes import write_fake_cifar, write_fake_fmnist


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A sandbox: HOME in tmp, no SPAFL_DATA, no Debian dir, a downloader that records calls and fails."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SPAFL_DATA", raising=False)
    monkeypatch.setattr(locate, "DEBIAN_FMNIST_DIR", tmp_path / "debian" / "fashion-mnist")
    calls = []

    def offline(url, dest, timeout):
        calls.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(locate, "download_file", offline)

    class Env:
        pass

    e = Env()
    e.tmp, e.home, e.cache, e.calls, e.monkeypatch = tmp_path, home, home / ".cache" / "spafl", calls, monkeypatch
    e.debian = tmp_path / "debian" / "fashion-mnist"
    return e


def test_cache_dir_uses_home(env):
    assert locate.cache_dir() == env.home / ".cache" / "spafl"


def test_data_dir_is_authoritative(env):
    write_fake_fmnist(env.cache / "fashion-mnist", 10, 5)  # present elsewhere: must not be used
    empty = env.tmp / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"not found in data dir {empty}.*train-images-idx3-ubyte.gz") as ei:
        load_dataset("fmnist", str(empty))
    assert "\n" not in str(ei.value)
    with pytest.raises(UserError, match=f"data dir {env.tmp / 'nope'} does not exist"):
        load_dataset("fmnist", str(env.tmp / "nope"))
    with pytest.raises(UserError, match=f"cifar10 files not found in data dir {empty}.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", str(empty))
    assert env.calls == []  # no download attempted


def test_data_dir_used(env):
    write_fake_fmnist(env.tmp / "mine", 12, 4)
    ds = load_dataset("fmnist", str(env.tmp / "mine"))
    assert ds.source == str(env.tmp / "mine") and ds.train_x.shape[0] == 12


def test_spafl_data_beats_cache_beats_debian(env):
    write_fake_fmnist(env.debian, 7, 3, seed=1)
    assert load_dataset("fmnist").source == str(env.debian)
    write_fake_fmnist(env.cache / "fashion-mnist", 8, 3, seed=2)
    assert load_dataset("fmnist").source == str(env.cache / "fashion-mnist")
    envdir = env.tmp / "envdata"
    write_fake_fmnist(envdir, 9, 3, seed=3)  # directly in the dir, not in a subfolder
    env.monkeypatch.setenv("SPAFL_DATA", str(envdir))
    ds = load_dataset("fmnist")
    assert ds.source == str(envdir) and ds.train_x.shape[0] == 9
    assert env.calls == []


def test_cifar_from_spafl_data_and_cache(env):
    write_fake_cifar(env.cache, "cifar10", 10, 2)
    assert load_dataset("cifar10").source == str(env.cache)
    envdir = env.tmp / "envdata"
    write_fake_cifar(envdir, "cifar10", 15, 2)
    env.monkeypatch.setenv("SPAFL_DATA", str(envdir))
    ds = load_dataset("cifar10")
    assert ds.source == str(envdir) and ds.train_x.shape[0] == 15


def test_all_fail_error_lists_every_place(env):
    envdir = env.tmp / "envdata"
    env.monkeypatch.setenv("SPAFL_DATA", str(envdir))
    with pytest.raises(UserError) as ei:
        load_dataset("fmnist")
    msg = str(ei.value)
    assert "\n" not in msg
    for part in ("--data-dir", f"$SPAFL_DATA={envdir}", str(env.cache), str(env.debian),
                 locate.FMNIST_BASE_URL, "network disabled", "apt-get install dataset-fashion-mnist", "SPAFL_DATA=DIR"):
        assert part in msg, part
    assert env.calls == [locate.FMNIST_BASE_URL + fmnist.TRAIN_IMAGES]


def test_all_fail_cifar_and_download_disabled(env):
    with pytest.raises(UserError) as ei:
        load_dataset("cifar100", download=False)
    msg = str(ei.value)
    for part in ("$SPAFL_DATA (not set)", str(env.cache), "download (disabled)", "cifar-100-python.tar.gz"):
        assert part in msg, part
    assert "/usr/share/datasets" not in msg and str(env.debian) not in msg  # Debian is FMNIST-only
    assert env.calls == []


def _serve_from(env, source_dir: Path):
    """A fake downloader that 'downloads' files by name from source_dir."""
    served = []

    def fake(url, dest, timeout):
        assert timeout > 0
        name = url.rsplit("/", 1)[1]
        served.append(name)
        assert Path(dest).parent.is_dir() and Path(dest).name.endswith(".part")
        shutil.copyfile(source_dir / name, dest)

    env.monkeypatch.setattr(locate, "download_file", fake)
    return served


def _trust_fake_fmnist(env, source_dir: Path):
    for f in fmnist.FILES:
        digest = hashlib.sha256(gzip.decompress((source_dir / f).read_bytes())).hexdigest()
        env.monkeypatch.setitem(fmnist.DECOMPRESSED_SHA256, f, digest)


def test_download_fmnist_into_cache(env):
    src = env.tmp / "server"
    write_fake_fmnist(src, 20, 6, seed=9)
    served = _serve_from(env, src)
    _trust_fake_fmnist(env, src)
    ds = load_dataset("fmnist")
    folder = env.cache / "fashion-mnist"
    assert sorted(served) == sorted(fmnist.FILES)
    assert ds.source == str(folder) and ds.train_x.shape[0] == 20
    assert sorted(p.name for p in folder.iterdir()) == sorted(fmnist.FILES)  # no temp files left
    served.clear()
    load_dataset("fmnist")  # now found in the cache: no second download
    assert served == []


def test_download_goes_to_spafl_data(env):
    src = env.tmp / "server"
    write_fake_cifar(src, "cifar100", 10, 3)
    content = (src / "cifar-100-python.tar.gz").read_bytes()
    env.monkeypatch.setitem(cifar.TARBALL_SHA256, "cifar100", hashlib.sha256(content).hexdigest())
    env.monkeypatch.setitem(cifar.TARBALL_MD5, "cifar100", hashlib.md5(content, usedforsecurity=False).hexdigest())
    served = _serve_from(env, src)
    envdir = env.tmp / "envdata"
    env.monkeypatch.setenv("SPAFL_DATA", str(envdir))
    ds = load_dataset("cifar100")
    assert served == ["cifar-100-python.tar.gz"]
    assert ds.source == str(envdir)
    assert (envdir / "cifar-100-python.tar.gz").read_bytes() == content
    assert not env.cache.exists()


def test_download_checksum_mismatch_deletes(env):
    src = env.tmp / "server"
    write_fake_fmnist(src, 20, 6, seed=9)  # not the official content: the real checksums reject it
    _serve_from(env, src)
    with pytest.raises(UserError, match=r"failed verification and was deleted.*train-images-idx3-ubyte.gz.*does not match"):
        load_dataset("fmnist")
    assert not (env.home / ".cache").exists()  # nor the folders the failed download created


def test_download_cifar_checksum_mismatch_deletes(env):
    src = env.tmp / "server"
    write_fake_cifar(src, "cifar10", 10, 2)
    _serve_from(env, src)
    with pytest.raises(UserError, match="SHA-256 .* does not match the official 6d958be0"):
        load_dataset("cifar10")
    assert not (env.home / ".cache").exists()  # nor the folders the failed download created


def test_interrupted_download_leaves_nothing(env):
    def broken(url, dest, timeout):
        Path(dest).write_bytes(b"partial")
        raise TimeoutError("timed out")

    env.monkeypatch.setattr(locate, "download_file", broken)
    with pytest.raises(UserError, match="failed: timed out"):
        load_dataset("cifar10")
    assert not (env.home / ".cache").exists()  # nor the folders the failed download created


def test_fetch(env):
    # found: returns the directory without downloading
    write_fake_fmnist(env.debian, 5, 2)
    assert fetch("fmnist", None) == env.debian
    # explicit directory: downloads into it
    src = env.tmp / "server"
    write_fake_cifar(src, "cifar10", 10, 2)
    content = (src / "cifar-10-python.tar.gz").read_bytes()
    env.monkeypatch.setitem(cifar.TARBALL_SHA256, "cifar10", hashlib.sha256(content).hexdigest())
    env.monkeypatch.setitem(cifar.TARBALL_MD5, "cifar10", hashlib.md5(content, usedforsecurity=False).hexdigest())
    served = _serve_from(env, src)
    target = env.tmp / "target"
    assert fetch("cifar10", str(target)) == target
    assert served == ["cifar-10-python.tar.gz"] and (target / "cifar-10-python.tar.gz").is_file()
    assert fetch("cifar10", str(target)) == target and served == ["cifar-10-python.tar.gz"]
    with pytest.raises(UserError, match="nothing to fetch"):
        fetch("synthetic", None)


def test_fetch_failure_message(env):
    with pytest.raises(UserError, match=r"cifar100 files not in .*download from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz failed"):
        fetch("cifar100", str(env.tmp / "x"))
    assert not (env.tmp / "x").exists()  # the failed download removed the folder it created


def test_a_failed_download_removes_only_the_empty_folders_it_created(env):
    mine = env.tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="failed"):
        fetch("fmnist", str(mine / "new" / "deeper"))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="failed"):
        fetch("fmnist", str(mine))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # its fashion-mnist/ is gone again, the folder stays


def test_unknown_dataset(env):
    with pytest.raises(UserError, match="unknown dataset 'mnist'; choose one of: fmnist, cifar10, cifar100, synthetic"):
        load_dataset("mnist")
