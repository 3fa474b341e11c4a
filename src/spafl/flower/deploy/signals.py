"""How `spafl deploy-local` reacts to SIGINT (Ctrl-C), SIGTERM and SIGHUP, by design.

* Only the deploy-local process decides. Every process it starts runs in a
  session of its own (``start_new_session``), so a Ctrl-C at the terminal,
  which goes to the foreground process group, reaches deploy-local alone; it
  then stops the others itself (SIGTERM, SIGKILL after a grace period).
* :class:`InterruptGuard` installs the handlers explicitly, SIGINT included.
  A process started with SIGINT ignored (a background job of a
  non-interactive shell, some CI runners and test harnesses) inherits that
  disposition, and Python then leaves SIGINT ignored: a Ctrl-C or
  ``kill -INT`` did nothing, and deploy-local and its Flower processes ran
  on. An inherited SIGHUP ``SIG_IGN`` (``nohup``) is respected.
* The first signal raises KeyboardInterrupt once, in the main thread; any
  later one is only counted, so it cannot cut the clean-up short.
* Every wait of the main thread is bounded and wakes up at least every few
  tenths of a second (no blocking read of a pipe: the output of children
  goes to files), so the KeyboardInterrupt surfaces promptly.
* :meth:`LocalDeployment.stop` holds SIGINT/SIGTERM/SIGHUP back while it
  stops the processes and delivers them afterwards; it is idempotent and
  :func:`deploy_local` calls it again in a ``finally``, which completes a
  stop that an interrupt cut short.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from typing import Any


class InterruptGuard:
    """In the main thread: the first SIGINT, SIGTERM or SIGHUP raises KeyboardInterrupt; later ones are only counted.

    Use as a context manager around the whole command; the previous handlers
    come back on exit. SIGINT and SIGTERM are handled even when the process
    was started with them ignored; SIGHUP is left ignored if it was (``nohup``).
    Outside the main thread it does nothing.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> None:
        self.signals = tuple(signals)
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            if sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup: stay immune to the hang-up
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


class _SignalsHeld:
    """While active (main thread only): SIGINT, SIGTERM and SIGHUP are recorded instead of handled; on exit the
    previous handlers come back and each recorded signal is raised again, once, so it is deferred, not lost.

    Signals that are ignored stay ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def __enter__(self) -> _SignalsHeld:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                handler = signal.getsignal(sig)
                if handler is None or handler == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        for sig in dict.fromkeys(self.received):
            signal.raise_signal(sig)  # runs the restored handler (e.g. KeyboardInterrupt) right after this
