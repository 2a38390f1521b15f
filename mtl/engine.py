"""The serving engine: continuous batching of mixed-task requests over a slotted KV cache.

Requests arrive as token ids with a task name and sampling settings and wait in
a bounded queue. Each iteration of the engine (:meth:`Engine.run_once`)

1. takes waiting requests into prefill batches of ``prefill_batch`` rows,
   padded to one of a few prompt-length buckets (full batches first, then the
   narrowest bucket, see :meth:`Engine._pick`): requests of non-generation
   tasks (classify, regress, tag) are answered from that prefill and never
   take a slot; generation requests get their first token from it and are
   inserted into free decode slots;
2. queues one jitted chunk of up to ``steps_per_call`` decode steps for all
   ``max_batch`` slots (decode state donated); the chunk ends where enough
   budgets run out for the next prefill batch to be admitted, so admission
   loses nothing to chunking, and, while requests wait and EOS or a stop
   sequence may end a slot sooner, as soon as that many slots are done on
   device;
3. reads back the previous iteration's results while that chunk runs (one
   read a chunk, not a step) and hands each request its tokens; a request ends
   on EOS, its ``max_new_tokens``, a stop sequence or a cancel.

With no request waiting, the host schedules from token budgets alone and never
waits for a chunk's tokens before queueing the next one; a request that ends on
EOS is then seen one chunk late, its slot idling meanwhile (done on device),
which costs nothing while nobody waits for a slot. A chunk that may end early is
read before the next one is queued. Stop sequences are matched on device (the
slot is done and stops advancing, ``decode.stop_array``) and again on the host
as the tokens are read, which also catches those too long to match on device.

With ``batching="static"`` the same functions run under the old policy: new
generation requests are admitted only when every slot is free, so a batch
decodes until its longest request is done (kept for comparison).

Shapes are fixed by ``max_batch``, ``prefill_batch``, the buckets and the
model's ``max_len``; :meth:`Engine.warmup` compiles every one of them, and
nothing compiles afterwards. The decode state is partitioned over the serving
mesh like the model: slots over ``data`` (and ``fsdp``), kv heads over
``tensor``. The engine keeps a second copy of the weights laid out for serving
(``decode.DecodeWeights``), made again whenever ``params`` is assigned.
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
    ``priority`` and ``deadline_ms`` apply to every request (see :class:`Engine`).
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
    """The engine's queue holds ``max_queue`` requests already; try again later."""


class Cancelled(RuntimeError):
    """The request was cancelled before it finished."""


class DeadlineExceeded(Cancelled):
    """The request was still waiting or running when its ``deadline_ms`` passed, and was cancelled."""


class Ticket:
    """A submitted request: wait for its result, or cancel it. Thread-safe.

    ``on_tokens``, if given, is called on the engine's thread with a copy of the
    tokens generated so far each time a read gives the request new ones and it
    goes on (its end comes through :meth:`add_done_callback`): what streaming
    builds on. The tokens may still end in a stop sequence's first tokens,
    which the finished result drops.
    """

    def __init__(self, request: Request, generates: bool, on_tokens: Callable[[list[int]], Any] | None = None):
        self.request = request
        self.generates = generates
        self.on_tokens = on_tokens
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


@dataclasses.dataclass(eq=False)
class _Active:
    """A generation request in a decode slot, as the host sees it."""

    ticket: Ticket
    budget: int
    first_at: float
    tokens: list[int]  # read back so far
    scheduled: int = 0  # tokens the dispatched prefill and chunks will have produced


@dataclasses.dataclass
class _Prefilled:
    """A dispatched prefill, its results not yet read: one ``_Active`` a generation row, else None."""

    picked: list[Ticket]
    actives: list[_Active | None]
    first: jax.Array
    heads: dict[str, jax.Array]


@dataclasses.dataclass
class _Decoded:
    """A dispatched chunk of decode steps and who held each slot when it was queued."""

    tokens: jax.Array  # [steps_per_call, B]
    ran: jax.Array  # [] the steps it ran: ``steps``, or fewer if it could end early
    steps: int  # the steps it was given
    occupants: list[_Active | None]


SCHEDULERS = ("fair", "fifo")


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
      eos_id: the tokenizer's end id, or every id that ends a generation
        (a model's generation config may list several); any of them stops a slot.
      pad_id: the tokenizer's padding id.
      prefill_batch: prompts prefilled together (default ``min(max_batch, 8)``).
      max_queue: requests that may wait; :meth:`submit` raises QueueFull beyond.
      batching: ``"continuous"`` (default) or ``"static"``.
      steps_per_call: the most decode steps one jitted call runs (see
        :meth:`run_once`); more amortises dispatch and read-back, fewer lets
        arrivals in sooner.
      scheduler: the order waiting requests are admitted in, after their
        ``priority`` (higher first): ``"fifo"``, arrival order; ``"fair"``
        (default), arrival order except that a task holding more than its
        share of the decode slots (``max_batch`` over the tasks with generation
        requests running or waiting, plus a slack of ``max_batch // 4``) yields
        free slots to the other tasks' requests, and non-generation requests
        take turns by task in prefill batches, so one task flooding the queue
        cannot starve another. Every slot generates one token a step, so equal
        slot shares are equal shares of the generated tokens.

    A request past its ``deadline_ms`` (from its arrival) is cancelled at the
    next iteration, waiting or running, and fails with :class:`DeadlineExceeded`.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        mesh: jax.sharding.Mesh,
        *,
        max_batch: int,
        allowed_tokens: np.ndarray,
        eos_id: int | Sequence[int],
        pad_id: int,
        prefill_batch: int | None = None,
        max_queue: int = 1024,
        batching: str = "continuous",
        steps_per_call: int = 8,
        scheduler: str = "fair",
    ):
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching {batching!r} must be 'continuous' or 'static'")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r} must be one of {', '.join(SCHEDULERS)}")
        self.scheduler = scheduler
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call {steps_per_call} must be at least 1")
        self.cfg = model.cfg
        self.mesh = mesh
        self.max_batch = max_batch
        self.prefill_batch = prefill_batch or min(max_batch, 8)
        self.max_queue = max_queue
        self.batching = batching
        self.steps_per_call = steps_per_call
        self.eos_ids = tuple(int(i) for i in np.atleast_1d(eos_id))
        self.pad_id = pad_id
        self.buckets = length_buckets(self.cfg.max_len)
        self.graphdef, params = nnx.split(model)
        self._weights = jax.jit(lambda p: decode.decode_weights(nnx.merge(self.graphdef, p)))
        self.params = params  # lays out the decode weights too
        self.allowed = jnp.asarray(allowed_tokens, bool)
        self.kinds = {h.task: h.kind for h in self.cfg.heads}
        self.task_ids = {h.task: i for i, h in enumerate(self.cfg.heads)}
        self.head_names: dict[str, str] = {}  # a task added while serving -> the head it answers from (task_admin)
        self.traces = collections.Counter()  # compilations by function, counted as they trace

        self.state = self._empty_state()
        state_shardings = self._shardings(self._rows_template(self.max_batch))
        rows_shardings = self._shardings(self._rows_template(self.prefill_batch))
        # Fixed output shardings: whatever bucket a prefill ran at, its rows meet the one compiled insert.
        # The host reads tokens and head outputs; with several processes it can read only whole
        # (replicated) arrays, so there they are gathered on every device (one process: unchanged).
        host = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if jax.process_count() > 1 else None
        options = _compiler_options(mesh)
        self._prefill = jax.jit(self._prefill_fn, out_shardings=(rows_shardings, host, host), compiler_options=options)
        self._insert = jax.jit(self._insert_fn, donate_argnums=0, out_shardings=state_shardings)
        self._step = jax.jit(
            self._step_fn, donate_argnums=2, out_shardings=(state_shardings, host, host), compiler_options=options
        )
        # Whether a slot can end before its budget on device: then a chunk ends early for waiting requests.
        self._eos_allowed = bool(np.asarray(allowed_tokens)[list(self.eos_ids)].any())

        self.slots: list[_Active | None] = [None] * max_batch  # who holds each slot for the next chunk
        self._in_flight: collections.deque[_Prefilled | _Decoded] = collections.deque()  # in dispatch order
        self.queue: collections.deque[Ticket] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = collections.Counter()  # steps, calls, prefills, tokens, cancelled: for benchmarks and tests

    # Pure functions of (params, arrays); jitted once per shape.

    def _prefill_fn(self, params, weights, tokens, lengths, task_ids, sampling, max_new, stops):
        self.traces["prefill"] += 1
        model = nnx.merge(self.graphdef, params)
        s = self.cfg.max_len
        return decode.prefill_rows(
            model, weights, tokens, lengths, task_ids, sampling, max_new, self.allowed, self.eos_ids, s, stops
        )

    def _insert_fn(self, state, rows, slots):
        self.traces["insert"] += 1
        return decode.insert(state, rows, slots)

    def _step_fn(self, params, weights, state, steps, stop_after):
        self.traces["step"] += 1
        model = nnx.merge(self.graphdef, params)
        return decode.decode_steps(
            model, weights, state, steps, stop_after, self.steps_per_call, self.allowed, self.eos_ids
        )

    @property
    def params(self) -> nnx.State:
        """The model's parameters; assigning new ones (after a train step) lays out the decode weights again."""
        return self._params

    @params.setter
    def params(self, params: nnx.State) -> None:
        self._params = params
        # Plain dicts of arrays: the programs are called with them, and they flatten far faster.
        self._arrays = nnx.to_pure_dict(params)
        with jax.set_mesh(self.mesh):
            self.weights = self._weights(self._arrays)

    # Arrays on the mesh.

    def _rows_template(self, n: int) -> decode.DecodeState:
        """``n`` free (done) rows with a zero cache, as numpy arrays."""
        cfg = self.cfg
        return decode.DecodeState(
            cache=decode.empty_cache(cfg, n, zeros=np.zeros),
            tokens=np.zeros(n, np.int32),
            positions=np.zeros(n, np.int32),
            task_ids=np.zeros(n, np.int32),
            sampling=_sampling_arrays(n),
            done=np.ones(n, bool),
            remaining=np.zeros(n, np.int32),
            stops=decode.stop_array((), n),
            recent=np.zeros((n, decode.STOP_TOKENS), np.int32),
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

    def submit(self, request: Request, on_tokens: Callable[[list[int]], Any] | None = None) -> Ticket:
        """Queues one request of any task; thread-safe. ``on_tokens``: see :class:`Ticket`.

        Raises:
          ValueError: an unknown task, or a prompt empty or longer than the model allows.
          QueueFull: ``max_queue`` requests are waiting already.
        """
        if request.task not in self.kinds:
            raise ValueError(f"unknown task {request.task!r}; this model serves {', '.join(sorted(self.kinds))}")
        n, limit = len(request.prompt), self.max_prompt_len()
        if not 1 <= n <= limit:
            raise ValueError(f"a prompt of {n} tokens cannot be served; prompts take 1 to {limit} tokens")
        ticket = Ticket(request, self.kinds[request.task] == "generate", on_tokens)
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
        return bool(self.queue) or any(self.slots) or bool(self._in_flight)

    def has_requests_of(self, task: str) -> bool:
        """Whether a request of ``task`` is queued, in a slot or in a dispatched prefill (``mtl.task_admin``)."""
        with self._lock:
            tickets = [*self.queue, *(a.ticket for a in self.slots if a)]
            tickets += [t for item in self._in_flight if isinstance(item, _Prefilled) for t in item.picked]
            return any(t.request.task == task for t in tickets)

    # The loop.

    def run_once(self) -> None:
        """One iteration: dispatch prefills for what fits and a chunk of decode steps, then hand out
        the results of the previous iteration.

        Dispatch is asynchronous and, with no request waiting, the host schedules from
        token budgets alone, so it queues the next chunk before it reads the last one: the
        device never waits for the host's bookkeeping. A chunk that may end early (requests
        waiting, EOS possible) is read in the same iteration, so its freed slots are filled
        in the next.
        """
        self._drop_cancelled()
        self._drop_expired()
        # Static batching admits generation requests only into an empty batch, and then fills it.
        admit = self.batching == "continuous" or not any(self.slots)
        keep = 0
        with jax.set_mesh(self.mesh):
            while True:
                picked = self._pick(admit)
                if not picked:
                    break
                self._prefill_and_insert(picked)
            if any(self.slots):
                # The chunk just queued runs while the host reads the older results; one that may
                # end early is read now, since the next iteration's schedule depends on its length.
                keep = 0 if self._decode() else 1
        while len(self._in_flight) > keep:
            self._deliver(self._in_flight.popleft())

    def _drop_cancelled(self) -> None:
        for slot, active in enumerate(self.slots):
            if active is not None and active.ticket.cancelled:
                self.slots[slot] = None
                self.stats["cancelled"] += 1
                active.ticket._finish(error=Cancelled("the request was cancelled"))

    def _drop_expired(self) -> None:
        """Cancels every request, waiting or in a slot, whose ``deadline_ms`` has passed."""
        now = time.perf_counter()

        def expired(ticket: Ticket) -> bool:
            r = ticket.request
            return r.deadline_ms is not None and now > r.arrival + r.deadline_ms / 1e3 and not ticket.done()

        def fail(ticket: Ticket) -> None:
            r = ticket.request
            self.stats["expired"] += 1
            waited = (now - r.arrival) * 1e3
            message = f"the request passed its deadline_ms of {r.deadline_ms:g} ({waited:.0f} ms since it arrived)"
            ticket._finish(error=DeadlineExceeded(message + " before it was answered, and was cancelled"))

        with self._lock:
            late = [t for t in self.queue if expired(t)]
            for ticket in late:
                self.queue.remove(ticket)
                fail(ticket)
        for slot, active in enumerate(self.slots):
            if active is not None and expired(active.ticket):
                self.slots[slot] = None
                fail(active.ticket)

    def _order(self, tickets: list[Ticket], free: int) -> list[Ticket]:
        """The candidates for the next prefill batch, the scheduler's first choice first.

        ``tickets`` are the waiting requests in arrival order. Priority comes first
        (higher first), then arrival, except under the fair scheduler (see
        :class:`Engine`): a generation request whose task holds more than its share
        of the slots goes after the others of its priority, and non-generation
        requests take turns by task. Generation requests beyond the first ``free``
        are left out: they would find no slot.
        """
        rank: dict[Ticket, tuple] = {}
        if self.scheduler == "fair":
            held = collections.Counter(a.ticket.request.task for a in self.slots if a is not None)
            tasks = set(held) | {t.request.task for t in tickets if t.generates}
            # A task's share of the slots, and the slack it may hold beyond it before it yields: with the
            # slack, a mix of tasks arriving at similar rates is served in arrival order (no throughput lost
            # to reordering), while a task flooding the queue cannot keep another's requests out of the slots.
            limit = self.max_batch / max(1, len(tasks)) + self.max_batch // 4
            turns = collections.Counter()
            for t in sorted(tickets, key=lambda t: -t.request.priority):
                task = t.request.task
                if t.generates:
                    over = held[task] >= limit
                    held[task] += not over
                    rank[t] = (over, 0)
                else:
                    rank[t] = (False, turns[task])
                    turns[task] += 1
        ordered = sorted(tickets, key=lambda t: (-t.request.priority, *rank.get(t, ())))  # stable: arrival order
        kept = []
        for t in ordered:
            if t.generates:
                if free == 0:
                    continue
                free -= 1
            kept.append(t)
        return kept

    def _pick(self, admit_generation: bool) -> list[Ticket]:
        """Waiting requests for the next prefill batch: any non-generation request,
        and generation requests while free slots remain.

        A prefill costs its rows times its width, whatever its requests, so the batch
        is filled first and kept as narrow as that allows: its length bucket is the
        smallest (no less than the oldest request's) that holds as many requests as
        the widest would, and the longest prompts that fit go first, so that long
        prompts are prefilled together instead of each widening a batch of short
        ones. The candidates are those the scheduler admits first (:meth:`_order`):
        every non-generation request, and as many generation requests as there are
        free slots; the first of them is always in the batch.
        """
        free = self.slots.count(None) if admit_generation else 0
        with self._lock:
            # Under load (more generation requests waiting than free slots), wait for a full
            # prefill batch rather than prefilling a few rows at a full batch's cost.
            waiting = sum(t.generates for t in self.queue)
            eligible = len(self.queue) - waiting + min(free, waiting)
            if eligible < self.prefill_batch and waiting > free and any(self.slots):
                return []
            candidates = self._order(list(self.queue), free)
            if not candidates:
                return []
            head, rest = candidates[0], candidates[1:]
            rest.sort(key=lambda t: -self.bucket(t.request))  # stable: arrival order within a bucket

            def fill(width: int) -> list[Ticket]:
                picked, slots = [], free
                for t in (head, *rest):
                    if len(picked) < self.prefill_batch and self.bucket(t.request) <= width:
                        if t.generates and slots == 0:
                            continue
                        picked.append(t)
                        slots -= t.generates
                return picked

            widths = [b for b in self.buckets if b >= self.bucket(head.request)]
            most = len(fill(widths[-1]))
            picked = next(p for p in map(fill, widths) if len(p) == most)
            for ticket in picked:
                self.queue.remove(ticket)
        return picked

    def _prefill_and_insert(self, picked: list[Ticket]) -> None:
        """Dispatches a prefill of ``picked`` and the insertion of its generation rows into free slots."""
        p = self.prefill_batch
        width = max(self.bucket(t.request) for t in picked)
        tokens = np.full((p, width), self.pad_id, np.int32)
        lengths = np.ones(p, np.int32)
        task_ids = np.zeros(p, np.int32)
        max_new = np.ones(p, np.int32)
        sampling = _sampling_arrays(p)
        slots = np.full(p, self.max_batch, np.int32)  # out of range: not inserted
        actives: list[_Active | None] = []
        for row, t in enumerate(picked):
            r = t.request
            tokens[row, : len(r.prompt)] = r.prompt
            lengths[row] = len(r.prompt)
            task_ids[row] = self.task_ids[r.task]
            max_new[row] = self._budget(r)
            sampling.temperature[row], sampling.top_k[row], sampling.top_p[row] = r.temperature, r.top_k, r.top_p
            sampling.seed[row] = r.seed
            active = _Active(t, int(max_new[row]), 0.0, [], scheduled=1) if t.generates else None
            if active is not None and active.budget > 1:  # a budget of 1 is spent by the prefill
                slots[row] = self.slots.index(None)
                self.slots[slots[row]] = active
            actives.append(active)
        stops = decode.stop_array([t.request.stop for t in picked], p)
        # Host arrays go straight into the call (inside run_once's mesh): a device_put costs more.
        rows, first, heads = self._prefill(
            self._arrays, self.weights, tokens, lengths, task_ids, sampling, max_new, stops
        )
        if (slots < self.max_batch).any():
            self.state = self._insert(self.state, rows, slots)
        for a in (first, *jax.tree.leaves(heads)):
            a.copy_to_host_async()
        self._in_flight.append(_Prefilled(picked, actives, first, heads))
        self.stats["prefills"] += 1

    def _budget(self, r: Request) -> int:
        return max(1, min(r.max_new_tokens, self.cfg.max_len - len(r.prompt)))

    def _chunk(self) -> tuple[int, int]:
        """Decode steps for the next call, and how many slots ending on device end it early.

        Steps: up to the step at which enough budgets run out for the next prefill batch
        to be admitted (see :meth:`_pick`; under static batching, all of them), else a full
        chunk. When requests are waiting and EOS or a stop sequence may end a slot sooner, the chunk also ends
        as soon as that many slots are done, so freed slots do not idle until its end.
        """
        left = sorted(a.budget - a.scheduled for a in self.slots if a is not None)
        waiting = sum(t.generates for t in self.queue)
        needed = len(left)
        if waiting and self.batching == "continuous":
            needed = min(self.prefill_batch - (len(self.queue) - waiting), waiting) - self.slots.count(None)
            needed = min(max(needed, 1), len(left))
            soonest = left[needed - 1]
        else:
            soonest = left[-1]
        # A slot ends on device on EOS (when allowed) or on one of its stop sequences.
        early = bool(waiting) and (
            self._eos_allowed or any(a is not None and a.ticket.request.stop for a in self.slots)
        )
        return max(1, min(self.steps_per_call, soonest)), needed if early else self.max_batch + 1

    def _decode(self) -> bool:
        """Dispatches a chunk of decode steps; returns whether it may end early.

        A slot whose budget the chunk spends is free at once, unless the chunk may end
        early; then slots are freed as their requests end, when the chunk is read.
        """
        steps, stop_after = self._chunk()
        early = stop_after <= self.max_batch
        self.state, tokens, ran = self._step(
            self._arrays, self.weights, self.state, np.int32(steps), np.int32(stop_after)
        )
        tokens.copy_to_host_async()
        self._in_flight.append(_Decoded(tokens, ran, steps, list(self.slots)))
        self.stats["calls"] += 1
        self.stats["steps"] += steps
        for slot, active in enumerate(self.slots):
            if active is not None:
                active.scheduled += steps
                if active.scheduled >= active.budget and not early:
                    self.slots[slot] = None
        return early

    def _deliver(self, done: _Prefilled | _Decoded) -> None:
        """Hands out the results of a dispatched prefill or chunk (waiting for them)."""
        if isinstance(done, _Prefilled):
            first, heads = jax.device_get((done.first, done.heads))
            now = time.perf_counter()
            for row, (t, active) in enumerate(zip(done.picked, done.actives)):
                if active is None:
                    head = self.head_names.get(t.request.task, t.request.task)
                    t._finish(HeadOutput(heads[head][row], (now - t.request.arrival) * 1e3))
                else:
                    active.first_at = now
                    if not self._advance(active, int(first[row]), now):
                        self._progress(active)
            return
        tokens, ran = jax.device_get((done.tokens, done.ran))
        ran = int(ran)
        tokens = np.asarray(tokens)[:ran].T.tolist()  # [B][steps run]
        if ran < done.steps:  # ended early: the steps it did not run are scheduled again
            self.stats["steps"] -= done.steps - ran
            for active in done.occupants:
                if active is not None:
                    active.scheduled -= done.steps - ran
        now = time.perf_counter()
        for active, row in zip(done.occupants, tokens):
            if active is None:
                continue
            for token in row:
                if self._advance(active, token, now):
                    break
            else:
                self._progress(active)

    @staticmethod
    def _progress(active: _Active) -> None:
        """Tells a request that goes on its tokens so far, if it asked (streaming)."""
        ticket = active.ticket
        if ticket.on_tokens is not None and not ticket.done():
            try:
                ticket.on_tokens(list(active.tokens))
            except Exception:  # a listener gone (a closed event loop): nobody reads the rest
                ticket.cancelled = True

    def _advance(self, active: _Active, token: int, now: float) -> bool:
        """Gives a request its next token; finishes it, frees its slot and returns True when it ends."""
        if active.ticket.done():  # ended (or was cancelled) before this token was read
            return True
        reason = None
        if token in self.eos_ids:
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
        if active in self.slots:
            self.slots[self.slots.index(active)] = None
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
            args = (np.zeros((p, width), np.int32), np.ones(p, np.int32), np.zeros(p, np.int32))
            with jax.set_mesh(self.mesh):
                rows, first, heads = self._prefill(
                    self._arrays,
                    self.weights,
                    *args,
                    _sampling_arrays(p),
                    np.ones(p, np.int32),
                    decode.stop_array((), p),
                )
                jax.device_get((first, heads))
        drop = np.full(p, self.max_batch, np.int32)
        with jax.set_mesh(self.mesh):
            self.state = self._insert(self.state, rows, drop)
            # Every slot is done: nothing changes.
            self.state, tokens, _ = self._step(self._arrays, self.weights, self.state, np.int32(1), np.int32(1))
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
                for done in self._in_flight:
                    for t in done.picked if isinstance(done, _Prefilled) else [a.ticket for a in done.occupants if a]:
                        t._finish(error=e)
                self._in_flight.clear()
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


# XLA:CPU hands dots, element-wise ops and reductions to YNNPACK by default (jaxlib 0.10). For the
# serving programs' small-batch matmuls Eigen is faster, while YNNPACK sums the decode attention's
# broadcast products about 3x faster than either library's batched matmul does them (see
# docs/serving.md), so the engine's programs, and only they, keep YNNPACK for reductions alone.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def _compiler_options(mesh: jax.sharding.Mesh) -> dict[str, str] | None:
    """The engine's XLA options for ``mesh``'s platform, if this XLA knows them."""
    if mesh.devices.flat[0].platform != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(np.int32(0)).compile()
    except Exception:  # an XLA without the option: its defaults
        return None
    return _CPU_OPTIONS


def _sampling_arrays(n: int) -> decode.Sampling:
    """Greedy defaults for ``n`` rows, as numpy arrays to fill in."""
    return decode.Sampling(
        temperature=np.zeros(n, np.float32),
        top_k=np.zeros(n, np.int32),
        top_p=np.ones(n, np.float32),
        seed=np.zeros(n, np.uint32),
    )
