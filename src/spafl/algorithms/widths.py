"""Width slicing, shared by the width-slicing baselines (HeteroFL, FjORD): physically smaller sub-models.

A sub-model of width p keeps the first ``ceil(p * C)`` output units of every
*hidden* masked layer (C = its number of output units) and the matching
input columns of the layer it feeds; the model's input channels and the
classes are kept. Each model has a table (:data:`WIDTH_TABLES`) naming, for
every masked layer, the layer whose output is its input and the BatchNorm
that normalizes its output. A linear layer fed by a flattened conv output
keeps the columns of the kept channels: flattening is channel-major, so
``c`` kept channels of ``H x W`` positions are its first ``c * H * W`` columns
(LeNet-5's fc1: 16 per channel of conv2). Every slice is therefore a prefix
in every dimension (``tensor[:a, :b, ...]``), which is all that
:func:`slice_state` and :func:`covered_mean` use.

The sub-model is built as the same model class (``spec.factory()``) whose
masked layers and BatchNorm layers are replaced, by module name, by smaller
ones of the same kind; nothing depends on the models' ``forward``. Masking
is switched off (:func:`spafl.nn.set_masking`): these methods train dense
weights and never use thresholds. BatchNorm is *static* (HeteroFL's sBN):
while training it normalizes with the batch's statistics and tracks no
running statistics; at evaluation, the evaluated model's statistics are
computed from the evaluating client's own training split (cumulative
average, one pass in order, no augmentation) and then used on its test split.

:class:`SlicedAlgorithm` is what both methods share: the global model on the
server, the tensors that travel (``weights/<state-dict key>``: every
floating-point entry of the static-BN sub-model but the masked layers'
``threshold`` and ``kept_fraction``; for LeNet-5 the four weights), the
per-width shapes, MACs and densities, building/caching the sub-models,
reply checks and evaluation. Density of an evaluated model is that of the
width used, relative to the full model: per masked layer sub-model weights /
full-model weights, their unweighted mean (``density``) and the
weight-weighted one (``density_weighted``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spafl.algorithms.base import Algorithm, ClientData, Message, Reply, State, check_named_tensors
from spafl.errors import UserError
from spafl.metrics.evaluation import ClientEval, evaluate_model, majority_correct
from spafl.metrics.flops import dense_macs_per_sample
from spafl.models.conv4 import Conv4
from spafl.models.lenet5 import LeNet5
from spafl.nn import MaskedConv2d, MaskedLinear, masked_layers, set_masking
from spafl.seeding import derive_seed

WEIGHTS = "weights/"
#: state-dict entries of a masked layer that never travel (thresholds are unused with masking off)
UNTRANSMITTED_PARTS = ("threshold", "kept_fraction")
#: a tag (far above any client id or round) that separates this module's random streams from the local-training one
STREAM = 1 << 40

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class WidthLayer:
    """One masked layer of a width table."""

    name: str
    #: the masked layer whose output units are this layer's input channels (None: the model's input, never sliced)
    fed_by: str | None
    #: whether its output units are hidden (sliced); False for the classes
    hidden: bool = True
    #: the BatchNorm that normalizes its output (sliced with it), if any
    norm: str | None = None


#: model class -> its width table, in forward order
WIDTH_TABLES: dict[type[nn.Module], tuple[WidthLayer, ...]] = {
    LeNet5: (
        WidthLayer("conv1", None),
        WidthLayer("conv2", "conv1"),
        WidthLayer("fc1", "conv2"),  # 16 columns (4 x 4 positions) per channel of conv2
        WidthLayer("fc2", "fc1", hidden=False),
    ),
    Conv4: (
        WidthLayer("conv1", None, norm="bn1"),
        WidthLayer("conv2", "conv1", norm="bn2"),
        WidthLayer("conv3", "conv2", norm="bn3"),
        WidthLayer("conv4", "conv3", norm="bn4"),
        WidthLayer("fc1", "conv4", norm="bn5"),  # 4 columns (2 x 2 positions) per channel of conv4
        WidthLayer("fc2", "fc1", norm="bn6"),
        WidthLayer("fc3", "fc2", hidden=False),
    ),
}
SUPPORTED_MODELS = "lenet5, conv4"


def width_table(model: nn.Module) -> tuple[WidthLayer, ...] | None:
    """The width table of ``model``'s class (or of a class it derives from); None: not supported."""
    for cls in type(model).__mro__:
        if cls in WIDTH_TABLES:
            return WIDTH_TABLES[cls]
    return None


def width_units(width: float, units: int) -> int:
    """``ceil(width * units)``, at least 1 (rounded first, so that 0.6 * 500 is 300, not 301)."""
    return max(1, math.ceil(round(width * units, 9)))


def prefix(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of the leading block of ``shape`` in a tensor of at least that shape."""
    return tuple(slice(0, size) for size in shape)


def slice_state(state: dict[str, torch.Tensor], shapes: Shapes) -> dict[str, torch.Tensor]:
    """``state``'s entries named in ``shapes``, each cut to its leading block of that shape (contiguous copies)."""
    return {name: state[name][prefix(shape)].clone(memory_format=torch.contiguous_format) for name, shape in shapes.items()}


def covered_mean(
    old: dict[str, torch.Tensor], contributions: list[tuple[dict[str, torch.Tensor], float, dict[str, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    """Per coordinate, the weighted mean of the contributions that hold it; a coordinate none holds keeps its ``old`` value.

    Each contribution is ``(tensors, weight, rows)``: ``tensors[name]`` is the
    leading block of ``old[name]`` of its shape; ``rows[name]``, where given, a
    bool per row (dim 0) saying which rows it contributes (the others count
    as not held). Sums are taken in float64 in the given order and rounded
    to ``old``'s dtype once. Returns a new dict; ``old`` is not changed.
    """
    new = dict(old)
    names = {name for tensors, _, _ in contributions for name in tensors}
    for name in names:
        target = old[name]
        total = torch.zeros(target.shape, dtype=torch.float64)
        weight = torch.zeros(target.shape, dtype=torch.float64)
        for tensors, share, rows in contributions:
            if share <= 0 or name not in tensors:
                continue
            values = tensors[name].to("cpu", torch.float64)
            cover = torch.full(values.shape, float(share), dtype=torch.float64)
            if name in rows:
                cover *= rows[name].to(torch.float64).view(-1, *([1] * (values.dim() - 1)))
            region = prefix(tuple(values.shape))
            total[region] += values * cover
            weight[region] += cover
        held = weight > 0
        mean = target.to("cpu", torch.float64, copy=True)
        mean[held] = total[held] / weight[held]
        new[name] = mean.to(target.dtype)
    return new


def width_generator(seed: int, *ids: int) -> torch.Generator:
    """A generator for a width draw, a function of (seed, ids) only, apart from the local-training stream."""
    return torch.Generator().manual_seed(derive_seed(seed, "client_train", STREAM, *ids))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _smaller_layer(layer: nn.Module, out_units: int, in_units: int) -> nn.Module:
    bias = layer.bias is not None
    if isinstance(layer, MaskedConv2d):
        if layer.groups != 1:
            raise ValueError("width slicing needs convolutions without groups")
        return MaskedConv2d(
            in_units, out_units, layer.kernel_size, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
            bias=bias,
        )
    if isinstance(layer, MaskedLinear):
        return MaskedLinear(in_units, out_units, bias=bias)
    raise ValueError(f"width slicing supports masked conv and linear layers, not {type(layer).__name__}")


def build_sliced(factory, table: tuple[WidthLayer, ...], width: float, track_statistics: bool) -> nn.Module:
    """The model of ``factory`` at ``width``: its masked and BatchNorm layers replaced by smaller ones, masking off.

    With ``track_statistics`` the BatchNorm layers track a cumulative average
    of batch statistics (``momentum=None``: evaluation, see the module
    docstring); otherwise they track none (static BN, training).
    """
    model = factory()
    layers = dict(masked_layers(model))
    units: dict[str, int] = {}
    for entry in table:
        layer = layers[entry.name]
        full_out = layer.weight.shape[0]
        out = width_units(width, full_out) if entry.hidden else full_out
        full_in = layer.weight.shape[1]
        if entry.fed_by is None:
            inputs = full_in
        else:
            feeding = layers[entry.fed_by].weight.shape[0]
            if full_in % feeding:
                raise ValueError(f"{entry.name}'s {full_in} inputs are not a multiple of {entry.fed_by}'s {feeding} units")
            inputs = units[entry.fed_by] * (full_in // feeding)
        units[entry.name] = out
        _replace(model, entry.name, _smaller_layer(layer, out, inputs))
        if entry.norm is not None:
            norm = model.get_submodule(entry.norm)
            _replace(model, entry.norm, type(norm)(
                out, eps=norm.eps, momentum=None if track_statistics else norm.momentum, affine=norm.affine,
                track_running_stats=track_statistics,
            ))
    return set_masking(model, False)


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def static_norm_statistics(model: nn.Module, data: ClientData, batch_size: int, device: torch.device) -> None:
    """Recompute the BatchNorm statistics of ``model`` from ``data``'s training split (in order, no augmentation).

    The statistics are a cumulative average over the batches (BatchNorm with
    ``momentum=None``); a batch of one sample is left out (BatchNorm1d cannot
    normalize it). Without training data they stay at mean 0, variance 1.
    """
    norms = norm_layers(model)
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
    model.train()
    for start in range(0, data.num_train, batch_size):
        images = data.train_x[start:start + batch_size]
        if images.shape[0] < 2:
            continue
        model(data.preprocess(images, train=False).to(device))
    model.eval()


class SlicedAlgorithm(Algorithm):
    """What HeteroFL and FjORD share: a global model, sub-models of given widths, their messages and evaluation.

    ``widths`` are the widths the method's clients may train (from its
    config); the full width 1 is always known too (the global model). A
    model without a width table is refused with a UserError, here, so that a
    run fails before it starts.
    """

    def __init__(self, config, spec, widths: tuple[float, ...]) -> None:
        super().__init__(config, spec)
        probe = spec.factory()
        table = width_table(probe)
        if table is None:
            raise UserError(
                f"{self.name} slices model widths and supports the models {SUPPORTED_MODELS}; got {config.model} "
                f"({type(probe).__name__})"
            )
        self.table = table
        self.widths = tuple(widths)
        self._models: dict[tuple[float, bool], nn.Module] = {}
        full = dict(masked_layers(probe))
        untransmitted = {f"{name}.{part}" for name in full for part in UNTRANSMITTED_PARTS}
        #: per width: the shapes of the tensors that travel; its MACs per sample; its densities
        self.shapes: dict[float, Shapes] = {}
        self.macs: dict[float, dict[str, int]] = {}
        self.densities: dict[float, tuple[float, float]] = {}
        for width in sorted(set(self.widths) | {1.0}):
            model = build_sliced(spec.factory, table, width, track_statistics=False)
            self.shapes[width] = {
                name: tuple(tensor.shape) for name, tensor in model.state_dict().items()
                if tensor.is_floating_point() and name not in untransmitted
            }
            # measured in evaluation mode, where only a model with running statistics can take a single sample
            self.macs[width] = dense_macs_per_sample(build_sliced(spec.factory, table, width, True), spec.input_shape)
            sizes = {name: layer.weight.numel() for name, layer in masked_layers(model)}
            ratios = [sizes[name] / full[name].weight.numel() for name in sizes]
            self.densities[width] = (sum(ratios) / len(ratios), sum(sizes.values()) / sum(l.weight.numel() for l in full.values()))
        self.names = list(self.shapes[1.0])
        #: the classes layer's tensors (weight, and bias if any): their rows are the classes
        last = table[-1].name
        self.class_rows = [name for name in self.names if name.rpartition(".")[0] == last]

    # -- sub-models ------------------------------------------------------------------
    def sliced_model(self, width: float, track_statistics: bool = False) -> nn.Module:
        """The (cached, shared) sub-model of ``width`` on the algorithm's device, prepared by the engine."""
        key = (width, track_statistics)
        if key not in self._models:
            model = build_sliced(self.spec.factory, self.table, width, track_statistics).to(self.device)
            self._models[key] = self.prepare(model)
        return self._models[key]

    def load(self, model: nn.Module, weights: dict[str, torch.Tensor], width: float) -> nn.Module:
        """Copy the travelling tensors of ``weights`` (already of ``width``'s shapes) into ``model``."""
        missing, unexpected = model.load_state_dict({name: weights[name] for name in self.shapes[width]}, strict=False)
        if unexpected or any(name in self.shapes[width] for name in missing):
            raise ValueError(f"weights do not fit the width-{width} model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model

    def fits(self, tensors: dict[str, torch.Tensor], width: float, prefix_: str = "") -> bool:
        """Whether ``tensors`` (named ``prefix_<key>``) hold every travelling tensor of ``width``'s shapes."""
        return all(prefix_ + n in tensors and tuple(tensors[prefix_ + n].shape) == s for n, s in self.shapes[width].items())

    def width_of(self, tensors: dict[str, torch.Tensor], prefix_: str = "") -> float | None:
        """A width whose shapes ``tensors`` have (widths of equal shapes give the same model); None: no known width."""
        return next((width for width in self.shapes if self.fits(tensors, width, prefix_)), None)

    def workspace(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The sub-model of the width ``weights`` have (full width without weights), loaded with them."""
        if weights is None:
            return self.sliced_model(1.0)
        width = self.width_of(weights)
        if width is None:
            raise ValueError("weights of no known width")
        return self.load(self.sliced_model(width), weights, width)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters that travel (thresholds get no gradient); ``requires_grad`` set accordingly."""
        trained = []
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in self.shapes[1.0])
            if parameter.requires_grad:
                trained.append(parameter)
        return trained

    # -- server ----------------------------------------------------------------------
    def init_server(self, initial_model):
        return {"model": dict(initial_model)}

    def message_for(self, server: State, width: float) -> Message:
        """The slice of the global model at ``width``, as it travels."""
        return {WEIGHTS + name: tensor for name, tensor in slice_state(server["model"], self.shapes[width]).items()}

    def check_slice(self, reply: Reply, width: float | None, extra: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str | None:
        """Why ``reply`` is not a slice of ``width`` (None: any known width) plus the ``extra`` tensors (None: it is)."""
        found = self.width_of(reply.message, WEIGHTS) if width is None else width
        if found is None or not self.fits(reply.message, found, WEIGHTS):
            wanted = "a known width" if width is None else f"width {width}"
            return f"tensor shapes are not those of {wanted} (allowed widths: {', '.join(map(str, self.widths))})"
        expected = {name: (shape, torch.float32) for name, shape in self.shapes[found].items()}
        why = check_named_tensors({k: v for k, v in reply.message.items() if k.startswith(WEIGHTS)}, WEIGHTS, expected, "weights")
        if why is not None:
            return why
        others = {k: v for k, v in reply.message.items() if not k.startswith(WEIGHTS)}
        return check_named_tensors(others, "", extra, "extra tensors") if (others or extra) else None

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self, weights, data, batch_size):
        """``weights`` (a slice of some width) with static-BN statistics from the client's training split, on its test split."""
        width = self.width_of(weights)
        if width is None:
            raise ValueError("evaluation weights of no known width")
        model = self.load(self.sliced_model(width, track_statistics=True), weights, width)
        static_norm_statistics(model, data, batch_size, self.device)
        correct, loss_sum = evaluate_model(model, data, batch_size, self.device)
        density, weighted = self.densities[width]
        return ClientEval(
            correct=correct, loss_sum=loss_sum, num_test=data.num_test,
            majority_correct=majority_correct(data.train_y, data.test_y, data.num_classes),
            density=density, density_weighted=weighted,
        )
