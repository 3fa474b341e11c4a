"""Config keys have one owner each; method, dataset and model names come from one registry each."""

import dataclasses
import re
import subprocess
import sys

import pytest

from spafl.algorithms import ALGORITHMS
from spafl.config import (
    FIELDS, SHARED_OWNERS, Config, build_config, choices_of, describe_keys, keys_of, owner_of, owners,
)
from spafl.data import cifar, fmnist, synthetic_dataset
from spafl.data.registry import DATASET_INFO, DATASETS, dataset_info
from spafl.errors import UserError
from spafl.models import INPUT_SHAPES, MODELS

COMMON = {
    "method", "model", "rounds", "num_clients", "clients_per_round", "local_epochs", "batch_size", "lr", "lr_decay",
    "lr_min", "momentum", "weight_decay", "grad_clip", "seed", "optimizer_scope",
}
DATA = {"dataset", "partition", "alpha", "min_client_samples", "pixels", "augment", "data_dir"}
ENGINE = {
    "eval_every", "eval_batch_size", "checkpoint_every", "device", "threads", "workers", "record_masks", "execution",
    "client_store", "eval_clients",
}
SPAFL = {
    "th_coeff", "th_coeff_warmup", "ste", "threshold_schedule", "importance_update", "importance_sign",
    "importance_delta", "aggregation_weighting", "frozen_weights", "collapse_guard", "threshold_clip",
}


def test_every_field_has_exactly_one_known_owner():
    allowed = set(SHARED_OWNERS) | set(ALGORITHMS)
    assert set(owners()) == allowed and len(owners()) == len(allowed)
    for spec in dataclasses.fields(Config):
        owner = spec.metadata.get("owner")
        assert isinstance(owner, str), f"{spec.name} declares no single owner: {owner!r}"
        assert owner in allowed, f"{spec.name}: unknown owner {owner!r}"
        assert owner_of(spec.name) == owner
    # the owners' key sets partition the fields
    sets = [keys_of(owner) for owner in owners()]
    assert sum(len(keys) for keys in sets) == len(FIELDS)
    assert frozenset().union(*sets) == frozenset(FIELDS)


def test_the_declared_owners():
    assert keys_of("common") == COMMON
    assert keys_of("data") == DATA
    assert keys_of("engine") == ENGINE
    assert keys_of("spafl") == SPAFL and len(SPAFL) == 11
    assert keys_of("fedavg") == keys_of("local") == frozenset()
    assert keys_of(*SHARED_OWNERS) == COMMON | DATA | ENGINE


def test_fields_are_grouped_by_owner_in_the_class():
    order = [FIELDS[name].metadata["owner"] for name in FIELDS]
    groups = [owner for index, owner in enumerate(order) if index == 0 or order[index - 1] != owner]
    assert len(groups) == len(set(groups)), f"owners interleave: {groups}"


def test_each_algorithm_reads_the_shared_keys_and_its_own():
    shared = COMMON | DATA | ENGINE
    assert ALGORITHMS["spafl"].keys() == shared | SPAFL
    assert ALGORITHMS["fedavg"].keys() == shared
    assert ALGORITHMS["local"].keys() == shared
    for name, algorithm in ALGORITHMS.items():
        assert algorithm.name == name
        assert algorithm.keys() == keys_of(*SHARED_OWNERS) | keys_of(name)
        assert not hasattr(algorithm, "own_keys")


def test_unknown_owner_and_key():
    with pytest.raises(ValueError, match="unknown config key owner 'fedprox'"):
        keys_of("fedprox")
    with pytest.raises(UserError, match="unknown config key 'th_coef'"):
        owner_of("th_coef")


def test_the_registries_are_the_choices():
    assert choices_of("method") == tuple(ALGORITHMS) == ("spafl", "fedavg", "local", "fedpm", "heterofl", "fjord", "fedp3", "fedspa", "lotteryfl")
    assert choices_of("dataset") == DATASETS == tuple(DATASET_INFO) == ("fmnist", "cifar10", "cifar100", "synthetic")
    assert choices_of("model") == tuple(MODELS) == tuple(INPUT_SHAPES) == ("lenet5", "conv4", "resnet18", "vit")
    assert choices_of("lr") is None
    for key, default in (("method", "spafl"), ("dataset", "fmnist"), ("model", "lenet5")):
        assert getattr(Config(), key) == default
    import spafl.config

    for copy in ("METHODS", "DATASETS", "MODEL_NAMES"):
        assert not hasattr(spafl.config, copy)


@pytest.mark.parametrize("key, choices", [
    ("method", "spafl, fedavg, local, fedpm, heterofl, fjord, fedp3, fedspa, lotteryfl"),
    ("dataset", "fmnist, cifar10, cifar100, synthetic"),
    ("model", "lenet5, conv4, resnet18, vit"),
])
def test_a_name_outside_its_registry_is_refused(key, choices):
    with pytest.raises(UserError, match=f"^{key} must be one of {choices}; got 'x'$"):
        build_config(None, None, {key: "x"})


def test_the_dataset_registry_knows_classes_and_image_shape_without_loading():
    assert {name: (info.num_classes, info.image_shape) for name, info in DATASET_INFO.items()} == {
        "fmnist": (10, (1, 28, 28)), "cifar10": (10, (3, 32, 32)), "cifar100": (100, (3, 32, 32)),
        "synthetic": (10, (1, 28, 28)),
    }
    # ... as the loaders have them
    assert dataset_info("fmnist").num_classes == fmnist.NUM_CLASSES
    for name in ("cifar10", "cifar100"):
        assert dataset_info(name).num_classes == cifar.SPECS[name].num_classes
        assert dataset_info(name).image_shape == cifar.IMAGE_SHAPE
    data = synthetic_dataset(num_train=20, num_test=10)
    assert (data.num_classes, data.image_shape) == (dataset_info("synthetic").num_classes, dataset_info("synthetic").image_shape)
    with pytest.raises(UserError, match="unknown dataset 'svhn'; choose one of: fmnist, cifar10, cifar100, synthetic"):
        dataset_info("svhn")


def test_registry_names_and_config_need_no_torch():
    code = ("import sys; from spafl.config import build_config, choices_of, keys_of, SHARED_OWNERS; "
            "from spafl.algorithms import ALGORITHMS; from spafl.models import MODELS, INPUT_SHAPES; "
            "from spafl.data import DATASET_INFO; "
            "build_config('cifar100-paper', None, {'method': 'fedavg'}); keys_of(*SHARED_OWNERS, 'spafl'); "
            "assert list(ALGORITHMS) and list(MODELS) and DATASET_INFO['cifar100'].num_classes == 100; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_keys_listing_is_grouped_by_owner():
    listing = describe_keys()
    headers = [line for line in listing.splitlines() if line.startswith("[")]
    assert [header.split("]")[0][1:] for header in headers] == [
        "common", "data", "engine", "spafl", "fedpm", "fedspa", "heterofl", "fjord", "fedp3", "lotteryfl",
    ]
    for name in FIELDS:
        assert f"\n{name} = " in listing
    spafl_block = listing.split("\n[spafl]")[1]
    assert all(f"\n{name} = " in spafl_block for name in SPAFL)
    fedavg = describe_keys(ALGORITHMS["fedavg"].keys())
    assert "[spafl]" not in fedavg and "th_coeff" not in fedavg and "\noptimizer_scope = " in fedavg


#: The keys each baseline owns (the shared ones aside).
BASELINE_KEYS = {
    "fedpm": {"fedpm_optimizer", "fedpm_lr", "fedpm_prior_reset"},
    "heterofl": {"heterofl_rates", "heterofl_mode", "heterofl_label_split"},
    "fjord": {"fjord_widths", "fjord_distill"},
    "fedp3": {"fedp3_upload", "fedp3_global_keep", "fedp3_local_prune", "fedp3_final_layer", "fedp3_weighting"},
    "fedspa": {"fedspa_density", "fedspa_prune_rate"},
    "lotteryfl": {"lotteryfl_start_acc", "lotteryfl_end_density", "lotteryfl_prune_percent"},
}


@pytest.mark.parametrize("name", list(BASELINE_KEYS))
def test_each_baseline_owns_exactly_its_keys(name):
    assert keys_of(name) == BASELINE_KEYS[name]
    assert ALGORITHMS[name].keys() == keys_of(*SHARED_OWNERS) | BASELINE_KEYS[name]


@pytest.mark.parametrize("key, value, message", [
    ("fedp3_upload", "opu4", "fedp3_upload must be one of opu2, opu3; got 'opu4'"),
    ("lotteryfl_prune_percent", 100, "lotteryfl_prune_percent must be <= 99; got 100.0"),
    ("fedpm_optimizer", "rmsprop", "fedpm_optimizer must be one of adam, sgd; got 'rmsprop'"),
    ("fedspa_density", 0, "fedspa_density must be > 0 and <= 1; got 0.0"),
])
def test_a_baseline_key_outside_its_bounds_is_one_line(key, value, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        build_config(None, None, {key: value})