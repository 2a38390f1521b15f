"""Requests and answers as the scheduler sees them: token ids in, tokens or a head's row out.

A :class:`Request` is what a client asked, in token ids; a :class:`Ticket` is
one submitted request, which a caller waits on or cancels and the scheduler
finishes with a :class:`Generation`, a :class:`HeadOutput` or an error. No
JAX here: these cross threads (the HTTP loop, the scheduler's loop) as plain
Python and numpy.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mtl.serving.task_table import Task


@dataclasses.dataclass(frozen=True)
class Request:
    """One request in token ids.

    ``stop`` holds token sequences that end a generation (the sequence itself
    is not returned); the other sampling fields apply to generation tasks only.
    ``priority`` and ``deadline_ms`` apply to every request (see
    :class:`mtl.serving.scheduler.Scheduler`).
    """

    task: str
    prompt: Sequence[int]
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[tuple[int, ...], ...] = ()
    priority: int = 0  # higher is admitted first
    deadline_ms: float | None = None  # from arrival; past it the request is cancelled (DeadlineExceeded)
    arrival: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: list[int]  # without the EOS or the stop sequence
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    ttft_ms: float
    latency_ms: float


@dataclasses.dataclass(frozen=True)
class HeadOutput:
    """A non-generation head's answer for one request (see ``MultiTaskModel.head_outputs``)."""

    values: np.ndarray  # classify: [C] label probabilities; other kinds: that head's row
    latency_ms: float


class QueueFull(RuntimeError):
    """The queue has no room for the request (or, fair admission, no room within its task's share).

    ``retry_after`` is the seconds a client should wait before it tries again.
    """

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class UnknownTask(ValueError):
    """The request names a task that is not served (never was, or was removed)."""


class Draining(RuntimeError):
    """The server is stopping: it finishes what it holds and takes nothing new."""


class Cancelled(RuntimeError):
    """The request was cancelled before it finished."""


class DeadlineExceeded(Cancelled):
    """The request was still waiting or running when its ``deadline_ms`` passed, and was cancelled."""


class Ticket:
    """A submitted request: wait for its result, or cancel it. Thread-safe.

    ``task`` is the task table's record of the request's task as it was when
    the request was admitted (its row stays the request's until it finishes,
    whatever happens to the task meanwhile). ``on_tokens``, if given, is
    called on the scheduler's thread with a copy of the tokens generated so
    far each time a read gives the request new ones and it goes on (its end
    comes through :meth:`add_done_callback`): what streaming builds on. The
    tokens may still end in a stop sequence's first tokens, which the
    finished result drops.
    """

    def __init__(self, request: Request, task: Task, on_tokens: Callable[[list[int]], Any] | None = None):
        self.request = request
        self.task = task
        self.on_tokens = on_tokens
        self.result: Generation | HeadOutput | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._event = threading.Event()
        self._callbacks: list[Callable[[Ticket], Any]] = []
        self._lock = threading.Lock()

    @property
    def generates(self) -> bool:
        return self.task.kind == "generate"

    def done(self) -> bool:
        return self._event.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Blocks until the request is answered or failed, without raising; returns whether it is."""
        return self._event.wait(timeout)

    def wait(self, timeout: float | None = None) -> Generation | HeadOutput:
        """Blocks until the request is answered; raises its error if it failed."""
        if not self._event.wait(timeout):
            raise TimeoutError("the request is not finished yet")
        if self.error is not None:
            raise self.error
        return self.result

    def add_done_callback(self, fn: Callable[[Ticket], Any]) -> None:
        """Calls ``fn(ticket)`` once finished (at once if it already is), on the finishing thread."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def finish(self, result=None, error: BaseException | None = None) -> None:
        """Answers the request (the scheduler's to call); a second call changes nothing."""
        with self._lock:
            if self._event.is_set():
                return
            self.result, self.error = result, error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
