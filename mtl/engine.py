"""The serving engine: continuous batching of mixed-task requests over a slotted KV cache.

Requests arrive as token ids with a task name and sampling settings and wait in
a bounded queue. Each iteration of the engine (:meth:`Engine.run_once`)

1. takes waiting requests into prefill batches of ``prefill_batch`` rows,
   padded to one of a few prompt-length buckets: requests of non-generation
   tasks (classify, regress, tag) are answered from that prefill and never
   take a slot; generation requests get their first token from it and are
   inserted into free decode slots;
2. runs one jitted decode step for all ``max_batch`` slots (decode state
   donated), and hands each live slot its new token; a slot whose request
   ends (EOS, its ``max_new_tokens``, a stop sequence, or a cancel) is free
   for the next iteration's prefill.

With ``batching="static"`` the same functions run under the old policy: new
generation requests are admitted only when every slot is free, so a batch
decodes until its longest request is done (kept for comparison).

Shapes are fixed by ``max_batch``, ``prefill_batch``, the buckets and the
model's ``max_len``; :meth:`Engine.warmup` compiles every one of them, and
nothing compiles afterwards. The decode state is partitioned over the serving
mesh like the model: slots over ``data`` (and ``fsdp``), kv heads over
``tensor``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl import decode
from mtl.model import MultiTaskModel
from sharding import named_sharding


@dataclasses.dataclass(frozen=True)
class Request:
    """One request in token ids.

    ``stop`` holds token sequences that end a generation (the sequence itself
    is not returned); the other sampling fields apply to generation tasks only.
    """

    task: str
    prompt: Sequence[int]
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[tuple[int, ...], ...] = ()
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
    """The engine's queue holds ``max_queue`` requests already; try again later."""


class Cancelled(RuntimeError):
    """The request was cancelled before it finished."""


class Ticket:
    """A submitted request: wait for its result, or cancel it. Thread-safe."""

    def __init__(self, request: Request, generates: bool):
        self.request = request
        self.generates = generates
        self.result: Generation | HeadOutput | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._event = threading.Event()
        self._callbacks: list[Callable[[Ticket], Any]] = []
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Generation | HeadOutput:
        """Blocks until the request is answered; raises its error if it failed."""
        if not self._event.wait(timeout):
            raise TimeoutError("the request is not finished yet")
        if self.error is not None:
            raise self.error
        return self.result

    def add_done_callback(self, fn: Callable[[Ticket], Any]) -> None:
        """Calls ``fn(ticket)`` once finished (at once if it already is), on the engine's thread."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, result=None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.result, self.error = result, error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


@dataclasses.dataclass
class _Active:
    """A generation request in a decode slot, as the host sees it."""

    ticket: Ticket
    budget: int
    first_at: float
    tokens: list[int]


def length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Prompt lengths to pad to: powers of two from ``smallest``, then ``max_len``."""
    buckets, size = [], smallest
    while size < max_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_len)


class Engine:
    """Serves requests of every task kind from one sharded model.

    Args:
      model: the model; its parameters keep the shardings they have.
      mesh: the serving mesh.
      max_batch: decode slots (generation requests decoded together).
      allowed_tokens: [V] bool, the tokens generation may produce.
      eos_id, pad_id: the tokenizer's end and padding ids.
      prefill_batch: prompts prefilled together (default ``min(max_batch, 8)``).
      max_queue: requests that may wait; :meth:`submit` raises QueueFull beyond.
      batching: ``"continuous"`` (default) or ``"static"``.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        mesh: jax.sharding.Mesh,
        *,
        max_batch: int,
        allowed_tokens: np.ndarray,
        eos_id: int,
        pad_id: int,
        prefill_batch: int | None = None,
        max_queue: int = 1024,
        batching: str = "continuous",
    ):
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching {batching!r} must be 'continuous' or 'static'")
        self.cfg = model.cfg
        self.mesh = mesh
        self.max_batch = max_batch
        self.prefill_batch = prefill_batch or min(max_batch, 8)
        self.max_queue = max_queue
        self.batching = batching
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.buckets = length_buckets(self.cfg.max_len)
        self.graphdef, self.params = nnx.split(model)
        self.allowed = jnp.asarray(allowed_tokens, bool)
        self.kinds = {h.task: h.kind for h in self.cfg.heads}
        self.task_ids = {h.task: i for i, h in enumerate(self.cfg.heads)}
        self.traces = collections.Counter()  # compilations by function, counted as they trace

        self._cache_dtype = jax.eval_shape(
            lambda p: nnx.merge(self.graphdef, p)(jnp.zeros((1, 1), jnp.int32), jnp.zeros(1, jnp.int32))[1].key,
            self.params,
        ).dtype
        self.state = self._empty_state()
        state_shardings = self._shardings(self._rows_template(self.max_batch))
        rows_shardings = self._shardings(self._rows_template(self.prefill_batch))
        # Fixed output shardings: whatever bucket a prefill ran at, its rows meet the one compiled insert.
        self._prefill = jax.jit(self._prefill_fn, out_shardings=(rows_shardings, None, None))
        self._insert = jax.jit(self._insert_fn, donate_argnums=0, out_shardings=state_shardings)
        self._step = jax.jit(self._step_fn, donate_argnums=1, out_shardings=(state_shardings, None))

        self.slots: list[_Active | None] = [None] * max_batch
        self.queue: collections.deque[Ticket] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = collections.Counter()  # steps, prefills, tokens, cancelled: for benchmarks and tests

    # Pure functions of (params, arrays); jitted once per shape.

    def _prefill_fn(self, params, tokens, lengths, task_ids, sampling, max_new):
        self.traces["prefill"] += 1
        model = nnx.merge(self.graphdef, params)
        s = self.cfg.max_len
        return decode.prefill_rows(model, tokens, lengths, task_ids, sampling, max_new, self.allowed, self.eos_id, s)

    def _insert_fn(self, state, rows, slots):
        self.traces["insert"] += 1
        return decode.insert(state, rows, slots)

    def _step_fn(self, params, state):
        self.traces["step"] += 1
        model = nnx.merge(self.graphdef, params)
        return decode.decode_step(model, state, self.allowed, self.eos_id)

    # Arrays on the mesh.

    def _put(self, array: np.ndarray, axes=None) -> jax.Array:
        axes = axes or ("batch",) + (None,) * (array.ndim - 1)
        return jax.device_put(array, named_sharding(axes, array.shape, self.mesh))

    def _rows_template(self, n: int) -> decode.DecodeState:
        """``n`` free (done) rows with a zero cache, as numpy arrays."""
        cfg = self.cfg
        cache_shape = (cfg.n_layers, n, cfg.max_len, cfg.n_kv_heads, cfg.head_dim)
        zeros = np.zeros(cache_shape, self._cache_dtype)
        return decode.DecodeState(
            cache=decode.KVCache(zeros, zeros),
            tokens=np.zeros(n, np.int32),
            positions=np.zeros(n, np.int32),
            task_ids=np.zeros(n, np.int32),
            sampling=_sampling_arrays(n),
            done=np.ones(n, bool),
            remaining=np.zeros(n, np.int32),
        )

    def _shardings(self, rows: decode.DecodeState):
        return jax.tree.map(lambda a, axes: named_sharding(axes, a.shape, self.mesh), rows, decode.state_axes(rows))

    def _empty_state(self) -> decode.DecodeState:
        """Every slot free (done), its cache zero, placed on the mesh."""
        template = self._rows_template(self.max_batch)
        return jax.tree.map(jax.device_put, template, self._shardings(template))

    # Admission.

    def max_prompt_len(self) -> int:
        return self.cfg.max_len - 1  # room for at least one new token

    def bucket(self, request: Request) -> int:
        return next(b for b in self.buckets if b >= len(request.prompt))

    def submit(self, request: Request) -> Ticket:
        """Queues one request of any task; thread-safe.

        Raises:
          ValueError: an unknown task, or a prompt empty or longer than the model allows.
          QueueFull: ``max_queue`` requests are waiting already.
        """
        if request.task not in self.kinds:
            raise ValueError(f"unknown task {request.task!r}; this model serves {', '.join(sorted(self.kinds))}")
        n, limit = len(request.prompt), self.max_prompt_len()
        if not 1 <= n <= limit:
            raise ValueError(f"a prompt of {n} tokens cannot be served; prompts take 1 to {limit} tokens")
        ticket = Ticket(request, self.kinds[request.task] == "generate")
        with self._lock:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests already; try again later")
            self.queue.append(ticket)
            self._lock.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drops a request: from the queue at once, from its slot at the next iteration."""
        with self._lock:
            ticket.cancelled = True
            if ticket in self.queue:
                self.queue.remove(ticket)
                self.stats["cancelled"] += 1
                ticket._finish(error=Cancelled("the request was cancelled"))

    def busy(self) -> bool:
        return bool(self.queue) or any(self.slots)

    # The loop.

    def run_once(self) -> None:
        """One iteration: prefill and insert what fits, then one decode step if any slot is live."""
        self._drop_cancelled()
        # Static batching admits generation requests only into an empty batch, and then fills it.
        admit = self.batching == "continuous" or not any(self.slots)
        while True:
            picked = self._pick(admit)
            if not picked:
                break
            self._prefill_and_insert(picked)
        if any(self.slots):
            self._decode()

    def _drop_cancelled(self) -> None:
        for slot, active in enumerate(self.slots):
            if active is not None and active.ticket.cancelled:
                self.slots[slot] = None
                self.stats["cancelled"] += 1
                active.ticket._finish(error=Cancelled("the request was cancelled"))

    def _pick(self, admit_generation: bool) -> list[Ticket]:
        """Waiting requests for the next prefill batch: any non-generation request,
        and generation requests while free slots remain."""
        free = self.slots.count(None) if admit_generation else 0
        picked = []
        with self._lock:
            # Under load (more generation requests waiting than free slots), wait for a full
            # prefill batch rather than prefilling a few rows at a full batch's cost.
            waiting = sum(t.generates for t in self.queue)
            eligible = len(self.queue) - waiting + min(free, waiting)
            if eligible < self.prefill_batch and waiting > free and any(self.slots):
                return []
            for ticket in self.queue:
                if len(picked) == self.prefill_batch:
                    break
                if not ticket.generates:
                    picked.append(ticket)
                elif free > 0:
                    picked.append(ticket)
                    free -= 1
            for ticket in picked:
                self.queue.remove(ticket)
        return picked

    def _prefill_and_insert(self, picked: list[Ticket]) -> None:
        p = self.prefill_batch
        width = max(self.bucket(t.request) for t in picked)
        tokens = np.full((p, width), self.pad_id, np.int32)
        lengths = np.ones(p, np.int32)
        task_ids = np.zeros(p, np.int32)
        max_new = np.ones(p, np.int32)
        sampling = _sampling_arrays(p)
        for row, t in enumerate(picked):
            r = t.request
            tokens[row, : len(r.prompt)] = r.prompt
            lengths[row] = len(r.prompt)
            task_ids[row] = self.task_ids[r.task]
            max_new[row] = self._budget(r)
            sampling.temperature[row], sampling.top_k[row], sampling.top_p[row] = r.temperature, r.top_k, r.top_p
            sampling.seed[row] = r.seed
        args = [self._put(a) for a in (tokens, lengths, task_ids)]
        with jax.set_mesh(self.mesh):
            rows, first, heads = self._prefill(
                self.params, *args, jax.tree.map(self._put, sampling), self._put(max_new)
            )
        first, heads = jax.device_get((first, heads))
        now = time.perf_counter()
        self.stats["prefills"] += 1
        slots = np.full(p, self.max_batch, np.int32)  # out of range: not inserted
        for row, t in enumerate(picked):
            if not t.generates:
                values = heads[t.request.task][row]
                t._finish(HeadOutput(values, (now - t.request.arrival) * 1e3))
                continue
            active = _Active(t, int(max_new[row]), now, [])
            if self._advance(active, int(first[row]), now):
                continue
            slot = self.slots.index(None)
            self.slots[slot] = active
            slots[row] = slot
        if (slots < self.max_batch).any():
            with jax.set_mesh(self.mesh):
                self.state = self._insert(self.state, rows, self._put(slots, (None,)))

    def _budget(self, r: Request) -> int:
        return max(1, min(r.max_new_tokens, self.cfg.max_len - len(r.prompt)))

    def _decode(self) -> None:
        with jax.set_mesh(self.mesh):
            self.state, tokens = self._step(self.params, self.state)
        tokens = np.asarray(jax.device_get(tokens))
        now = time.perf_counter()
        self.stats["steps"] += 1
        for slot, active in enumerate(self.slots):
            if active is not None and self._advance(active, int(tokens[slot]), now):
                self.slots[slot] = None

    def _advance(self, active: _Active, token: int, now: float) -> bool:
        """Gives a request its next token; finishes it and returns True when it ends."""
        reason = None
        if token == self.eos_id:
            reason = "stop"
        else:
            active.tokens.append(token)
            self.stats["tokens"] += 1
            for stop in active.ticket.request.stop:
                if stop and active.tokens[-len(stop) :] == list(stop):
                    del active.tokens[-len(stop) :]
                    reason = "stop"
                    break
            if reason is None and len(active.tokens) >= active.budget:
                reason = "length"
        if reason is None:
            return False
        arrival = active.ticket.request.arrival
        active.ticket._finish(
            Generation(active.tokens, reason, (active.first_at - arrival) * 1e3, (now - arrival) * 1e3)
        )
        return True

    # Start-up.

    def warmup(self) -> None:
        """Compiles every shape the engine will run: a prefill per bucket, the insert and the step.

        Runs them on dummy rows that are never inserted; the engine must be idle.
        """
        assert not self.busy(), "warm up an idle engine"
        p = self.prefill_batch
        for width in self.buckets:
            args = [self._put(a) for a in (np.zeros((p, width), np.int32), np.ones(p, np.int32), np.zeros(p, np.int32))]
            with jax.set_mesh(self.mesh):
                rows, first, heads = self._prefill(
                    self.params, *args, jax.tree.map(self._put, _sampling_arrays(p)), self._put(np.ones(p, np.int32))
                )
                jax.device_get((first, heads))
        drop = self._put(np.full(p, self.max_batch, np.int32), (None,))
        with jax.set_mesh(self.mesh):
            self.state = self._insert(self.state, rows, drop)
            self.state, tokens = self._step(self.params, self.state)  # every slot is done: nothing changes
        jax.device_get(tokens)

    # Background serving (HTTP) and blocking conveniences (batch mode, evaluation).

    def start(self) -> None:
        """Runs the engine loop on a background thread until :meth:`stop`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="mtl-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._lock:
                self._stopping = True
                self._lock.notify()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.busy():
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.run_once()
            except Exception as e:  # a bug: fail what is in flight, keep serving
                for slot, active in enumerate(self.slots):
                    if active is not None:
                        active.ticket._finish(error=e)
                        self.slots[slot] = None
                self.state = self._empty_state()

    def serve(self, requests: Sequence[Request], batching: str | None = None) -> list[Ticket]:
        """Submits requests (waiting for room in the queue) and runs until all are answered."""
        if self._thread is not None:
            tickets = [self._submit_waiting(r) for r in requests]
            for t in tickets:
                t._event.wait()
            return tickets
        previous, self.batching = self.batching, batching or self.batching
        try:
            tickets, pending = [], collections.deque(requests)
            while pending or self.busy():
                while pending and len(self.queue) < self.max_queue:
                    tickets.append(self.submit(pending.popleft()))
                self.run_once()
            return tickets
        finally:
            self.batching = previous

    def _submit_waiting(self, request: Request) -> Ticket:
        while True:
            try:
                return self.submit(request)
            except QueueFull:
                time.sleep(0.001)

    def score(self, requests: Sequence[Request]) -> list[HeadOutput]:
        """Answers requests of non-generation tasks (any mix of them) from their prefill."""
        return [t.wait() for t in self.serve(requests)]

    def generate(self, requests: Sequence[Request], batching: str | None = None) -> list[Generation]:
        """Generates for requests of any generation tasks; ``batching`` overrides the engine's policy."""
        return [t.wait() for t in self.serve(requests, batching)]


def _sampling_arrays(n: int) -> decode.Sampling:
    """Greedy defaults for ``n`` rows, as numpy arrays to fill in."""
    return decode.Sampling(
        temperature=np.zeros(n, np.float32),
        top_k=np.zeros(n, np.int32),
        top_p=np.ones(n, np.float32),
        seed=np.zeros(n, np.uint32),
    )
