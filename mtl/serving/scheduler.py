"""The scheduler: queues, admission, fairness, deadlines and decode slots. Host only, no JAX.

Requests arrive as token ids with a task name and sampling settings
(:class:`~mtl.serving.requests.Request`) and wait in a bounded queue. Each
iteration (:meth:`Scheduler.run_once`)

1. takes waiting requests into prefill batches of ``prefill_batch`` rows,
   padded to one of the engine's prompt-length buckets (full batches first,
   then the narrowest bucket, see :meth:`Scheduler._pick`): requests of
   non-generation tasks (classify, regress, tag) are answered from that prefill
   and never take a slot; generation requests get their first token from it
   and are inserted into free decode slots;
2. queues one chunk of up to ``steps_per_call`` decode steps for all
   ``max_batch`` slots; the chunk ends where enough budgets run out for the
   next prefill batch to be admitted, so admission loses nothing to chunking,
   and, while requests wait and EOS or a stop sequence may end a slot sooner,
   as soon as that many slots are done on device;
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

The device work is the engine's (:class:`mtl.serving.engine.Engine`): this
module calls its ``prefill``, ``decode`` and ``fetch`` and never touches an
array on the mesh. Which task holds which row is the task table's
(:class:`mtl.serving.task_table.TaskTable`): a request holds its task's row
from admission to its end.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from mtl.serving.requests import (
    Cancelled,
    DeadlineExceeded,
    Draining,
    Generation,
    HeadOutput,
    QueueFull,
    Request,
    Ticket,
    UnknownTask,
)
from mtl.serving.task_table import TaskTable

SCHEDULERS = ("fair", "fifo")


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
    outputs: Any  # the engine's (first tokens, head outputs), still on the device


@dataclasses.dataclass
class _Decoded:
    """A dispatched chunk of decode steps and who held each slot when it was queued."""

    outputs: Any  # the engine's (tokens [steps_per_call, B], steps run), still on the device
    steps: int  # the steps it was given
    occupants: list[_Active | None]


class Scheduler:
    """Serves requests of every task kind through one engine.

    Args:
      engine: the device side (``prefill``, ``decode``, ``fetch``, ``warmup``; its
        ``max_batch``, ``prefill_batch``, ``steps_per_call``, ``buckets``).
      table: who holds each task row; by default the engine's model's own tasks.
      max_queue: requests that may wait; :meth:`submit` raises QueueFull beyond.
      batching: ``"continuous"`` (default) or ``"static"``.
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
        engine,
        table: TaskTable | None = None,
        *,
        max_queue: int = 1024,
        batching: str = "continuous",
        scheduler: str = "fair",
    ):
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching {batching!r} must be 'continuous' or 'static'")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r} must be one of {', '.join(SCHEDULERS)}")
        self.engine = engine
        self.table = table if table is not None else TaskTable(engine.cfg.heads)
        self.scheduler = scheduler
        self.batching = batching
        self.max_queue = max_queue
        self.max_batch = engine.max_batch
        self.prefill_batch = engine.prefill_batch
        self.steps_per_call = engine.steps_per_call

        self.slots: list[_Active | None] = [None] * self.max_batch  # who holds each slot for the next chunk
        self._in_flight: collections.deque[_Prefilled | _Decoded] = collections.deque()  # in dispatch order
        self.queue: collections.deque[Ticket] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False  # stopping: nothing new is admitted
        self._aborting: Cancelled | None = None  # abort(): what the loop fails everything with
        self.stats = collections.Counter()  # steps, calls, prefills, tokens, cancelled: for benchmarks and tests

    # Admission.

    def max_prompt_len(self) -> int:
        return self.engine.max_prompt_len()

    def bucket(self, request: Request) -> int:
        return self.engine.bucket(len(request.prompt))

    def submit(self, request: Request, on_tokens: Callable[[list[int]], Any] | None = None) -> Ticket:
        """Queues one request of any task; thread-safe. ``on_tokens``: see :class:`Ticket`.

        Raises:
          UnknownTask: the task is not served.
          ValueError: a prompt empty or longer than the model allows.
          QueueFull: the queue is full and the task holds its share of it (see :meth:`submit_all`).
          Draining: the server is stopping.
        """
        return self.submit_all([request], [on_tokens])[0]

    def submit_all(
        self, requests: Sequence[Request], on_tokens: Sequence[Callable[[list[int]], Any] | None] | None = None
    ) -> list[Ticket]:
        """Queues several requests whole or not at all (one client request of several prompts); thread-safe.

        Fair admission: each task with requests waiting has an equal share of the queue
        (``max_queue`` over those tasks). Past ``max_queue`` waiting requests, a task still
        within its share is admitted all the same, so one task's flood never refuses another's
        trickle; a task above its share gets QueueFull. The queue may so hold up to twice
        ``max_queue`` while a flood is on.

        Raises:
          as :meth:`submit`; nothing of a refused call is queued.
        """
        limit = self.max_prompt_len()
        for r in requests:
            if not 1 <= len(r.prompt) <= limit:
                raise ValueError(
                    f"a prompt of {len(r.prompt)} tokens cannot be served; prompts take 1 to {limit} tokens"
                )
        if self.max_queue and len(requests) > self.max_queue:
            raise ValueError(f"{len(requests)} prompts in one request are more than the queue holds ({self.max_queue})")
        tickets = []
        try:
            for r, listener in zip(requests, on_tokens or [None] * len(requests)):
                task = self.table.acquire(r.task)
                if task is None:
                    served = ", ".join(self.table.names())
                    raise UnknownTask(f"unknown task {r.task!r}; this model serves {served}")
                tickets.append(Ticket(r, task, listener))
            with self._lock:
                self._admit(tickets)
                for ticket in tickets:
                    ticket.add_done_callback(lambda t: self.table.release(t.task))
                self.queue.extend(tickets)
                self._lock.notify()
        except BaseException:
            for ticket in tickets:
                self.table.release(ticket.task)
            raise
        return tickets

    def _admit(self, tickets: list[Ticket]) -> None:
        """Raises Draining or QueueFull if ``tickets`` may not join the queue now (under the lock)."""
        if self.draining:
            raise Draining("the server is shutting down and takes no new requests")
        if len(self.queue) + len(tickets) <= self.max_queue:
            return
        waiting = collections.Counter(t.request.task for t in self.queue)
        mine = collections.Counter(t.request.task for t in tickets)
        share = self.max_queue / len(set(waiting) | set(mine))
        over = [task for task, n in mine.items() if waiting[task] + n > share]
        if over:
            self.stats["refused"] += len(tickets)
            raise QueueFull(
                f"the queue is full ({len(self.queue)} waiting) and task {over[0]!r} holds its share of it "
                f"({waiting[over[0]]} of {share:.0f}); try again later"
            )

    def cancel(self, ticket: Ticket) -> None:
        """Drops a request: from the queue at once, from its slot at the next iteration."""
        with self._lock:
            ticket.cancelled = True
            if ticket in self.queue:
                self.queue.remove(ticket)
                self.stats["cancelled"] += 1
                ticket.finish(error=Cancelled("the request was cancelled"))

    def abort(self, reason: str) -> None:
        """Cancels every request, waiting or running, with ``reason`` (a stop that cannot wait); thread-safe.

        The queue is emptied at once; what is in slots or in flight is failed by the loop's thread at its
        next turn (at once if no loop runs).
        """
        error = Cancelled(reason)
        with self._lock:
            waiting, self.queue = list(self.queue), collections.deque()
            if self._thread is not None:
                self._aborting = error
                self._lock.notify()
        for ticket in waiting:
            ticket.finish(error=error)
        if self._thread is None:
            self._fail_all(error)

    def busy(self) -> bool:
        return bool(self.queue) or any(self.slots) or bool(self._in_flight)

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
                active.ticket.finish(error=Cancelled("the request was cancelled"))

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
            ticket.finish(error=DeadlineExceeded(message + " before it was answered, and was cancelled"))

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
        :class:`Scheduler`): a generation request whose task holds more than its share
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

            widths = [b for b in self.engine.buckets if b >= self.bucket(head.request)]
            most = len(fill(widths[-1]))
            picked = next(p for p in map(fill, widths) if len(p) == most)
            for ticket in picked:
                self.queue.remove(ticket)
        return picked

    def _prefill_and_insert(self, picked: list[Ticket]) -> None:
        """Dispatches a prefill of ``picked`` and the insertion of its generation rows into free slots."""
        budgets, slots, actives = [], [], []
        for t in picked:
            budget = self._budget(t.request)
            active = _Active(t, budget, 0.0, [], scheduled=1) if t.generates else None
            slot = None
            if active is not None and budget > 1:  # a budget of 1 is spent by the prefill
                slot = self.slots.index(None)
                self.slots[slot] = active
            budgets.append(budget)
            slots.append(slot)
            actives.append(active)
        outputs = self.engine.prefill([t.request for t in picked], [t.task.row for t in picked], budgets, slots)
        self._in_flight.append(_Prefilled(picked, actives, outputs))
        self.stats["prefills"] += 1

    def _budget(self, r: Request) -> int:
        return max(1, min(r.max_new_tokens, self.engine.cfg.max_len - len(r.prompt)))

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
            self.engine.eos_allowed or any(a is not None and a.ticket.request.stop for a in self.slots)
        )
        return max(1, min(self.steps_per_call, soonest)), needed if early else self.max_batch + 1

    def _decode(self) -> bool:
        """Dispatches a chunk of decode steps; returns whether it may end early.

        A slot whose budget the chunk spends is free at once, unless the chunk may end
        early; then slots are freed as their requests end, when the chunk is read.
        """
        steps, stop_after = self._chunk()
        early = stop_after <= self.max_batch
        # One past the last position a slot may write in these steps: a slot's position is its prompt's
        # length plus the tokens it was scheduled before this chunk, less one (its first came from the prefill).
        reach = max(len(a.ticket.request.prompt) + a.scheduled - 1 + steps for a in self.slots if a is not None)
        outputs = self.engine.decode(steps, stop_after, reach)
        self._in_flight.append(_Decoded(outputs, steps, list(self.slots)))
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
            first, heads = self.engine.fetch(done.outputs)
            now = time.perf_counter()
            for row, (t, active) in enumerate(zip(done.picked, done.actives)):
                if active is None:
                    t.finish(HeadOutput(heads[t.task.head][row], (now - t.request.arrival) * 1e3))
                else:
                    active.first_at = now
                    if not self._advance(active, int(first[row]), now):
                        self._progress(active)
            return
        tokens, ran = self.engine.fetch(done.outputs)
        ran = int(ran)
        tokens = tokens[:ran].T.tolist()  # [B][steps run]
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
        if token in self.engine.eos_ids:
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
        active.ticket.finish(
            Generation(active.tokens, reason, (active.first_at - arrival) * 1e3, (now - arrival) * 1e3)
        )
        return True

    # Start-up.

    def warmup(self) -> None:
        """Compiles every shape the engine will run (see :meth:`Engine.warmup`); the scheduler must be idle."""
        assert not self.busy(), "warm up an idle scheduler"
        self.engine.warmup()

    # Background serving (HTTP) and blocking conveniences (batch mode, evaluation).

    def start(self) -> None:
        """Runs the loop on a background thread until :meth:`stop`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="mtl-scheduler", daemon=True)
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
                aborting, self._aborting = self._aborting, None
            if aborting is not None:
                self._fail_all(aborting)
                continue
            try:
                self.run_once()
            except Exception as e:  # a bug: fail what is in flight, keep serving
                self._fail_all(e)

    def _fail_all(self, error: BaseException) -> None:
        """Fails every request in a slot or a dispatched call, and starts the device state afresh."""
        for done in self._in_flight:
            for t in done.picked if isinstance(done, _Prefilled) else [a.ticket for a in done.occupants if a]:
                t.finish(error=error)
        self._in_flight.clear()
        for slot, active in enumerate(self.slots):
            if active is not None:
                active.ticket.finish(error=error)
                self.slots[slot] = None
        self.engine.reset()

    def serve(self, requests: Sequence[Request], batching: str | None = None) -> list[Ticket]:
        """Submits requests (waiting for room in the queue) and runs until all are answered."""
        if self._thread is not None:
            tickets = [self._submit_waiting(r) for r in requests]
            for t in tickets:
                t.join()
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
