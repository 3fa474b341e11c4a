"""Where every client's persistent state lives between the rounds it takes part in.

Two stores with one interface: :class:`MemoryStore` keeps states in RAM,
:class:`DiskStore` keeps each client's state in its own file and loads only
the clients a round samples or evaluates. Both are lazy: a client never
written has the state ``init(client_id)`` (for the algorithms here, a dict
that shares the common initial tensors), so 10,000 untouched clients cost
nothing.

:class:`Clients` puts the store together with the broadcasts (one message
to every client after aggregation) that a client has not received yet: they
are logged once per round and replayed, in order, when the client is next
loaded, which gives exactly the state eager delivery would have given.

Crash consistency of :class:`DiskStore` with the checkpoint: a client's file
is named by the round it was written in (``c000042-r000017.pt``); a
checkpoint records the index {client: round}; once the checkpoint is on
disk the versions it no longer references are deleted, and on resume every
file the checkpoint does not reference (written after it) is deleted. So the
disk holds at most two versions of a client: the checkpointed one and the
latest.
"""

from __future__ import annotations

import itertools
import operator
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from spafl.errors import UserError
from spafl.runtime.record import interrupts_deferred

State = dict[str, Any]
Message = dict[str, torch.Tensor]

#: ``client_store=auto`` picks the disk when all clients' states would exceed this.
MEMORY_BUDGET = 1 << 30
CLIENTS_DIR = "clients"
_FILE = re.compile(r"c(\d+)-r(\d+)\.pt")
#: what :meth:`DiskStore.put` leaves when a crash interrupts it
_TEMPORARY = re.compile(r"\.c\d+-r\d+\.pt\.tmp-\d+")
_TOKENS = itertools.count(1)


def state_bytes(initial_model: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in initial_model.values())


def choose_store(setting: str, initial_model: dict[str, torch.Tensor], num_clients: int) -> str:
    """``memory`` or ``disk`` for ``client_store=setting``; auto estimates weights + optimizer state of every client."""
    if setting != "auto":
        return setting
    return "disk" if 2 * state_bytes(initial_model) * num_clients > MEMORY_BUDGET else "memory"


class ClientStore(ABC):
    """Client states by id; ``init(k)`` is the state of a client never written."""

    kind: ClassVar[str]

    def __init__(self, init: Callable[[int], State]) -> None:
        self.init = init

    @abstractmethod
    def get(self, client_id: int) -> State: ...

    @abstractmethod
    def put(self, client_id: int, state: State, version: int) -> None:
        """Keep ``state`` as the client's state; ``version`` is the round it was written in."""

    @property
    @abstractmethod
    def materialized(self) -> int:
        """How many clients have a state of their own (were written at least once)."""

    @abstractmethod
    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint needs to restore the store (with ``init``)."""

    @abstractmethod
    def restore(self, saved: dict[str, Any]) -> None: ...

    def clear(self) -> None:
        """Forget every written state (a fresh run)."""

    def flush(self) -> None:
        """Make every written state durable: called before a checkpoint references them."""

    def commit(self) -> None:
        """The checkpoint referencing the current states is written: older versions may go."""


class MemoryStore(ClientStore):
    """States in a dict; a checkpoint holds the written ones."""

    kind = "memory"

    def __init__(self, init: Callable[[int], State]) -> None:
        super().__init__(init)
        self.states: dict[int, State] = {}

    def get(self, client_id):
        state = self.states.get(client_id)
        return self.init(client_id) if state is None else state

    def put(self, client_id, state, version):
        self.states[client_id] = state

    @property
    def materialized(self):
        return len(self.states)

    def checkpoint_state(self):
        return {"kind": self.kind, "states": dict(self.states)}

    def restore(self, saved):
        self.states = dict(saved["states"])

    def clear(self):
        self.states = {}


class DiskStore(ClientStore):
    """One file per written client under ``directory``, versioned by round (see the module doc)."""

    kind = "disk"

    def __init__(self, init: Callable[[int], State], directory: str | Path) -> None:
        super().__init__(init)
        self.directory = Path(directory)
        self.index: dict[int, int] = {}  # client -> version of its current file
        self.committed: dict[int, int] = {}  # client -> version the last checkpoint references
        self.dirty: set[int] = set()  # clients written since the last checkpoint

    def path(self, client_id: int, version: int) -> Path:
        return self.directory / f"c{client_id:06d}-r{version:06d}.pt"

    def get(self, client_id):
        version = self.index.get(client_id)
        if version is None:
            return self.init(client_id)
        path = self.path(client_id, version)
        try:  # untrusted like the checkpoint: tensors and plain values only, never code
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            state = error
        if not isinstance(state, dict):
            reason = type(state).__name__
            raise UserError(
                f"client state {path} is unreadable, corrupt or not a spafl client state ({reason}; only tensors and plain "
                f"values are loaded); delete the run's checkpoint.pt to restart the run from round 0"
            )
        return state

    def put(self, client_id, state, version):
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(client_id, version)
        temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            with interrupts_deferred(), open(temporary, "wb") as handle:  # torch.save cut by Ctrl-C raises its own error
                torch.save(state, handle)
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)  # a full disk or an interrupt: no half-written file stays behind
            raise
        previous = self.index.get(client_id)
        self.index[client_id] = version
        self.dirty.add(client_id)
        if previous is not None and previous != version and previous != self.committed.get(client_id):
            self.path(client_id, previous).unlink(missing_ok=True)  # neither checkpointed nor current

    @property
    def materialized(self):
        return len(self.index)

    def checkpoint_state(self):
        return {"kind": self.kind, "index": dict(self.index)}

    def files(self) -> list[Path]:
        """The files of this store in the directory: client states and their temporaries, of any run.

        Nothing else there is touched (a user's notes, a subdirectory).
        """
        if not self.directory.is_dir():
            return []
        return sorted(
            path for path in self.directory.iterdir()
            if (_FILE.fullmatch(path.name) or _TEMPORARY.fullmatch(path.name)) and (path.is_file() or path.is_symlink())
        )

    def restore(self, saved):
        index = {int(k): int(v) for k, v in saved["index"].items()}
        keep = {self.path(k, v).name for k, v in index.items()}
        missing = [name for name in keep if not (self.directory / name).is_file()]
        if missing:
            raise UserError(
                f"{len(missing)} client state file(s) the checkpoint references are missing from {self.directory} "
                f"(e.g. {min(missing)}); the run cannot be resumed"
            )
        self.index, self.committed, self.dirty = index, dict(index), set()
        for path in self.files():
            if path.name not in keep:  # written after the checkpoint, or a crash's leftover
                path.unlink()

    def clear(self):
        for path in self.files():
            path.unlink()
        self.index, self.committed, self.dirty = {}, {}, set()

    def flush(self):
        for client_id in sorted(self.dirty):
            descriptor = os.open(self.path(client_id, self.index[client_id]), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        if self.dirty:
            descriptor = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    def commit(self):
        for client_id in self.dirty:
            old = self.committed.get(client_id)
            current = self.index[client_id]
            if old is not None and old != current:
                self.path(client_id, old).unlink(missing_ok=True)
            self.committed[client_id] = current
        self.dirty = set()


def make_store(kind: str, init: Callable[[int], State], run_dir: str | Path) -> ClientStore:
    if kind == "memory":
        return MemoryStore(init)
    if kind == "disk":
        return DiskStore(init, Path(run_dir) / CLIENTS_DIR)
    raise ValueError(f"unknown client store {kind!r}; allowed: memory, disk")


class Clients(Sequence):
    """Every client's state as eager delivery of all broadcasts would have left it.

    ``receive(state, message, round_index)`` applies one broadcast (the
    algorithm's ``client_receive``). ``applied[k]`` counts the broadcasts
    client k has received (absent: none); the log keeps every broadcast some
    client has not received yet. Reading ``clients[k]`` is :meth:`load`.
    """

    def __init__(self, store: ClientStore, receive: Callable[[State, Message, int], State], num_clients: int) -> None:
        self.store = store
        self.receive = receive
        self.num_clients = num_clients
        self.log: list[tuple[int, Message]] = []  # (round index, message), oldest first
        self.dropped = 0  # broadcasts every client has received, no longer in the log
        self.applied: dict[int, int] = {}
        self.version = 0  # the round states are written in (set by the engine)
        self.token = next(_TOKENS)  # tells this set of states from any other (e.g. one restored from a checkpoint)
        self._saves = itertools.count(1)
        self._revisions: dict[int, int] = {}  # client -> number of the save that wrote its state (absent: never saved)

    def __len__(self) -> int:
        return self.num_clients

    def __getitem__(self, client_id):
        client_id = operator.index(client_id)  # ids, not slices
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client {client_id} is not in 0..{self.num_clients - 1}")
        return self.load(client_id)

    def __iter__(self) -> Iterator[State]:
        return (self.load(k) for k in range(self.num_clients))

    @property
    def materialized(self) -> int:
        return self.store.materialized

    def load(self, client_id: int, write_back: bool = True) -> State:
        """Client ``client_id``'s state with every pending broadcast applied.

        With ``write_back`` a state that received broadcasts is stored again,
        so they are not replayed next time; without it the caller is expected
        to :meth:`save` the state (or to discard it).
        """
        state = self.store.get(client_id)
        pending = self.log[self.applied.get(client_id, 0) - self.dropped:]
        for round_index, message in pending:
            state = self.receive(state, message, round_index)
        if pending and write_back:
            self.save(client_id, state)
        return state

    @property
    def broadcasts_sent(self) -> int:
        """Broadcasts sent so far (those every client has received included)."""
        return self.dropped + len(self.log)

    def save(self, client_id: int, state: State) -> None:
        """Store a state that has received every broadcast so far."""
        self.store.put(client_id, state, self.version)
        self.applied[client_id] = self.broadcasts_sent
        self._revisions[client_id] = next(self._saves)

    def revision(self, client_id: int) -> int | None:
        """A number that stays the same exactly as long as client ``client_id``'s state does (within this object).

        None while a broadcast awaits the client: its state changes when it
        is next loaded. Not kept in checkpoints; a restored set of states
        has a new :attr:`token`.
        """
        if self.applied.get(client_id, 0) < self.broadcasts_sent:
            return None
        return self._revisions.get(client_id, 0)

    def broadcast(self, round_index: int, message: Message) -> None:
        """Round ``round_index``'s message to every client, delivered when each is next loaded."""
        self.log.append((round_index, {name: tensor.detach().clone() for name, tensor in message.items()}))
        if len(self.applied) == self.num_clients:  # only then can every client have received an entry
            received = min(self.applied.values())
            if received > self.dropped:
                del self.log[:received - self.dropped]
                self.dropped = received

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "store": self.store.checkpoint_state(),
            "log": list(self.log),
            "dropped": self.dropped,
            "applied": dict(self.applied),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        kind = saved["store"]["kind"]
        if kind != self.store.kind:
            raise UserError(f"the checkpoint was written with client_store={kind}; resume with --set client_store={kind}")
        self.store.restore(saved["store"])
        self.log = list(saved["log"])
        self.dropped = int(saved["dropped"])
        self.applied = {int(k): int(v) for k, v in saved["applied"].items()}
