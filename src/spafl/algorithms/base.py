"""The engine-agnostic interface every federated algorithm implements.

An algorithm is a handful of functions over plain data:

* ``init_server(initial_model) -> server state`` and
  ``init_client(client_id, initial_model) -> client state``;
* ``server_message(server, client_id, round) -> Message`` (down, to a sampled client);
* ``client_update(client, message, data, task) -> ClientResult``
  (new client state, the message up, and local statistics);
* ``aggregate(server, replies, round) -> server state``;
* optionally ``broadcast_message(server, round)`` / ``client_receive`` for one
  message sent to *every* client after aggregation;
* ``evaluation_state(client, server)``: the model weights a client is
  evaluated with.

States are dicts of tensors and plain values, so a checkpoint is a save of
the states. Messages are flat dicts of named tensors: exactly what travels,
and what :func:`spafl.metrics.bits.message_bits` counts. Nothing here knows
which engine (in-process simulator or Flower) calls it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from spafl.config import SHARED_OWNERS, keys_of
from spafl.data.transforms import Preprocess
from spafl.metrics.evaluation import ClientEval, evaluate_client
from spafl.seeding import derive_seed

Message = dict[str, torch.Tensor]
State = dict[str, Any]

if TYPE_CHECKING:
    from spafl.config import Config


def pack(prefix: str, tensors: dict[str, torch.Tensor]) -> Message:
    return {prefix + name: tensor for name, tensor in tensors.items()}


def unpack(prefix: str, message: Message, expected: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors named ``prefix<layer>``; with ``expected``, all those layers must be present."""
    found = {name[len(prefix):]: tensor for name, tensor in message.items() if name.startswith(prefix)}
    if expected is not None and set(found) != set(expected):
        missing = sorted(set(expected) - set(found))
        raise ValueError(f"message lacks {prefix}* tensors for layers {missing[:5]} (has {sorted(message)[:5]}...)")
    return found


def check_named_tensors(
    message: Message, prefix: str, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], what: str,
) -> str | None:
    """Why ``message`` is not exactly ``prefix<name>`` tensors of the expected shapes and dtypes, all finite (None: it is)."""
    names = {prefix + name for name in expected}
    if set(message) != names:
        missing = sorted(names - set(message))
        extra = sorted(set(message) - names)
        return f"tensor names differ from the model's {what} (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, (shape, dtype) in expected.items():
        tensor = message[prefix + name]
        if tuple(tensor.shape) != tuple(shape):
            return f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}"
        if tensor.dtype != dtype:
            return f"{name}: dtype {tensor.dtype}, expected {dtype}"
        if not torch.isfinite(tensor).all():
            return f"{name}: non-finite values"
    return None


@dataclass
class ClientData:
    """One client's local data as contiguous uint8 images and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    preprocess: Preprocess
    num_classes: int
    #: reference-style serving: a per-sample dataset behind a DataLoader (see spafl.data.batches)
    per_sample: bool = False

    @property
    def num_train(self) -> int:
        return int(self.train_y.numel())

    @property
    def num_test(self) -> int:
        return int(self.test_y.numel())


@dataclass(frozen=True)
class ClientTask:
    """Who trains in which round; all client randomness derives from these."""

    client_id: int
    round_index: int  # 0-based round t
    seed: int


@dataclass
class Reply:
    """A client's message up, as the server receives it."""

    client_id: int
    message: Message
    num_samples: int


@dataclass
class ClientResult:
    state: State
    message: Message
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """How to build the model every client starts from."""

    factory: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int

    def initial_state(self, seed: int) -> dict[str, torch.Tensor]:
        """The common initial model of all clients, a function of ``seed`` only."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "model_init"))
            model = self.factory()
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


class Algorithm(ABC):
    """Base class: holds the config and one reusable model workspace."""

    #: The method name (its key in :data:`spafl.algorithms.ALGORITHMS`, and the owner of its own config keys).
    name: ClassVar[str]
    #: Whether :meth:`evaluation_state` depends on the client's state only (not on the server's),
    #: so that a client whose state has not changed evaluates exactly as before.
    personal_evaluation: ClassVar[bool] = False
    #: Whether rows also report the uplink with its bitmasks entropy-coded (``bits_up_coded``, ``bits_cum_coded``),
    #: beside the raw bits (for an algorithm whose masks an arithmetic coder would compress).
    reports_coded_bits: ClassVar[bool] = False
    #: Whether a client update's stats also hold ``flops_true`` (training FLOPs with a linear counted once per position
    #: it is applied at: for a ViT, per token), beside the reference's count ``flops`` (rows: ``flops_true_cum``).
    reports_true_flops: ClassVar[bool] = False

    @property
    def has_collapse_guard(self) -> bool:
        """Whether rows count the collapse guard's resets (``guard_resets_train``; its evaluation reports ``guard_resets``)."""
        return False

    @classmethod
    def keys(cls) -> frozenset[str]:
        """Every config key that changes what this algorithm does: the shared ones and those it owns.

        Which keys an algorithm owns is declared at each field of :class:`spafl.config.Config`
        (``owner`` in its metadata); see :data:`spafl.config.SHARED_OWNERS`.
        """
        return keys_of(*SHARED_OWNERS, cls.name)

    def __init__(self, config: Config, spec: ModelSpec) -> None:
        self.config = config
        self.spec = spec
        self.device = torch.device(config.device)
        self._workspace: nn.Module | None = None
        #: Applied to every model the algorithm builds; the engine sets it to switch execution speed on
        #: (:func:`spafl.fast.enable`), the algorithm never looks at it.
        self.prepare: Callable[[nn.Module], nn.Module] = lambda model: model

    # -- the model workspace: one module reused for every client --------------
    def workspace(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The shared working model, loaded with ``weights`` if given."""
        if self._workspace is None:
            self._workspace = self.prepare(self.spec.factory().to(self.device))
        if weights is not None:
            self._workspace.load_state_dict(weights)
        return self._workspace

    @staticmethod
    def export(model: nn.Module) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's state, owned by the caller."""
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}

    # -- the protocol --------------------------------------------------------
    @abstractmethod
    def init_server(self, initial_model: dict[str, torch.Tensor]) -> State: ...

    @abstractmethod
    def init_client(self, client_id: int, initial_model: dict[str, torch.Tensor]) -> State: ...

    @abstractmethod
    def server_message(self, server: State, client_id: int, round_index: int) -> Message: ...

    @abstractmethod
    def client_update(self, client: State, message: Message, data: ClientData, task: ClientTask) -> ClientResult: ...

    @abstractmethod
    def aggregate(self, server: State, replies: list[Reply], round_index: int) -> State: ...

    def broadcast_message(self, server: State, round_index: int) -> Message | None:
        """The one message sent to *every* client after round ``round_index``'s aggregation (None: no broadcast).

        It is the same for all N clients and its bits are counted N times.
        An engine may deliver it late (when it next loads a client), so
        :meth:`client_receive` must give the same result whenever it runs,
        provided a client receives the broadcasts in round order before
        anything else touches it.
        """
        return None

    @property
    def may_broadcast(self) -> bool:
        """Whether :meth:`broadcast_message` can return a message in this configuration (default: whether it is overridden)."""
        return type(self).broadcast_message is not Algorithm.broadcast_message

    def client_receive(self, client: State, message: Message, round_index: int) -> State:
        """Apply round ``round_index``'s broadcast message to a client's state."""
        return client

    @abstractmethod
    def evaluation_state(self, client: State, server: State) -> dict[str, torch.Tensor]:
        """The weights client ``client`` is evaluated with."""

    def evaluate(self, weights: dict[str, torch.Tensor], data: ClientData, batch_size: int) -> ClientEval:
        """Evaluate ``weights`` (from :meth:`evaluation_state`) on ``data``'s test split, with this algorithm's density.

        The default loads them into the workspace and measures the density of
        its masked layers' kept units; a method whose model is sliced or
        masked per weight overrides this.
        """
        return evaluate_client(self.workspace(weights), data, batch_size, self.device)

    def absorb_evaluation(self, client: State, weights: dict[str, torch.Tensor]) -> State:
        """The client's state after an evaluation that changed its weights (:attr:`ClientEval.after`).

        Only a method whose evaluation can change the model (SpaFL's collapse
        guard) returns ``after``; it overrides this to keep those weights.
        """
        raise NotImplementedError(f"{self.name}'s evaluation does not change a client's weights")

    def validate_reply(self, server: State, reply: Reply) -> str | None:
        """Why a reply must be rejected (None: it is acceptable)."""
        return None
