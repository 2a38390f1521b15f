"""The scheduler over its engine: slots refilled as they free, mixed tasks, stops,
admission control, cancelling, and no compilation after warm-up."""

import contextlib
import dataclasses
import time

import jax
import numpy as np
import pytest
from flax import nnx

from mtl.model import MultiTaskModel
from mtl.serving.requests import Cancelled, DeadlineExceeded, QueueFull, Request
from sharding import make_mesh
from tests.helpers import randomise_adapters, scheduler_over, tiny_model_config

CFG = tiny_model_config(max_len=32)
EOS = 2
NO_EOS = np.arange(CFG.vocab_size) >= 3  # EOS banned too: lengths follow max_new_tokens exactly


@pytest.fixture(scope="module")
def plain_engine():
    """One warmed-up scheduler for the module: 4 slots, prefills of 2, generation never stops early."""
    model = MultiTaskModel(CFG, rngs=nnx.Rngs(1))
    mesh = make_mesh("data=1", jax.devices()[:1])
    sched = scheduler_over(model, mesh, max_batch=4, prefill_batch=2, allowed_tokens=NO_EOS, eos_id=EOS, pad_id=0)
    sched.warmup()
    return sched


@pytest.fixture
def sched(request):
    """The plain scheduler; tests marked ``both_engines`` run on the adapter scheduler too."""
    return request.getfixturevalue(getattr(request, "param", "plain_engine"))


@pytest.fixture(scope="module")
def adapter_engine():
    """The same scheduler over a model whose every task has its own (random, as if trained) adapters."""
    model = randomise_adapters(MultiTaskModel(dataclasses.replace(CFG, adapter_rank=4), rngs=nnx.Rngs(1)))
    mesh = make_mesh("data=1", jax.devices()[:1])
    sched = scheduler_over(model, mesh, max_batch=4, prefill_batch=2, allowed_tokens=NO_EOS, eos_id=EOS, pad_id=0)
    sched.warmup()
    return sched


# Tests that run on the plain scheduler and again on the adapter scheduler (rows of different adapters in one batch).
both_engines = pytest.mark.parametrize("sched", ["plain_engine", "adapter_engine"], indirect=True)


@contextlib.contextmanager
def counting_compilations():
    """Counts every XLA compilation in the process (jitted or eager) while the block runs."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def gen(prompt, n, task="spell", **kw):
    return Request(task=task, prompt=[1, *prompt, 3], max_new_tokens=n, **kw)


def test_warmup_compiles_every_bucket_once(sched):
    assert sched.engine.traces == {"prefill": len(sched.engine.buckets), "insert": 1, "step": 1}


def test_a_freed_slot_is_refilled_on_the_next_step(sched):
    # Slot sharing: one long request, then many short ones that cycle through the other slots.
    requests = [gen([40], 20)] + [gen([50 + i], 3) for i in range(9)]
    before = sched.stats["steps"]
    continuous = sched.generate(requests)
    continuous_steps = sched.stats["steps"] - before
    before = sched.stats["steps"]
    static = sched.generate(requests, batching="static")
    static_steps = sched.stats["steps"] - before
    assert [g.tokens for g in continuous] == [g.tokens for g in static]
    assert [len(g.tokens) for g in continuous] == [20] + [3] * 9
    # Continuous: the long request's 19 steps cover all short ones (3 slots, 2 steps each, 3 rounds).
    assert continuous_steps == 19
    # Static: batches of 4 wait for their longest: 19 + 2 + 2 steps.
    assert static_steps == 23
    assert all(g.finish_reason == "length" for g in continuous)


@both_engines
def test_greedy_output_is_the_same_alone_and_among_other_tasks(sched):
    target = gen([40, 41, 42], 12)
    alone = sched.generate([target])[0].tokens
    crowd = [
        gen(list(range(60, 85)), 5, task="echo", temperature=1.0, seed=3),
        Request(task="lang", prompt=[1, 9, 9, 3]),
        gen([90], 2, temperature=0.7, top_k=5, seed=1),
        gen([5, 6, 7], 9, task="echo", top_p=0.5, temperature=0.9),
        Request(task="lang", prompt=[1] + list(range(100, 125)) + [3]),
        gen([8], 4, task="echo"),
    ]
    tickets = [sched.submit(r) for r in crowd[:3]]
    sched.run_once()  # the crowd is decoding when the target arrives
    tickets += [sched.submit(target)] + [sched.submit(r) for r in crowd[3:]]
    while sched.busy():
        sched.run_once()
    assert tickets[3].wait().tokens == alone
    assert tickets[1].wait().values.shape == (5,)


def test_chunks_end_early_for_waiting_requests_when_slots_end_on_eos():
    # EOS is one of 3 allowed tokens, sampled hot: most requests end on EOS early, some at their budget.
    model = MultiTaskModel(CFG, rngs=nnx.Rngs(4))
    allowed = np.zeros(CFG.vocab_size, bool)
    allowed[[EOS, 40, 41]] = True
    mesh = make_mesh("data=1", jax.devices()[:1])
    sched = scheduler_over(model, mesh, max_batch=4, prefill_batch=2, allowed_tokens=allowed, eos_id=EOS, pad_id=0)

    def served(requests, early, batching=None):
        """(tokens and finish reason of each request, decode steps run), with chunks ending early or not."""
        sched.engine.eos_allowed = early  # False: chunks run their planned steps, as before early ends
        before = sched.stats["steps"]
        generations = sched.generate(requests, batching)
        return [(g.tokens, g.finish_reason) for g in generations], sched.stats["steps"] - before

    requests = [gen([50 + i, 60 + i], 12, temperature=3.0, seed=i) for i in range(24)]
    (ended, steps), (planned, planned_steps) = served(requests, True), served(requests, False)
    assert ended == planned
    reasons = [reason for _, reason in ended]
    assert 0 < reasons.count("length") < reasons.count("stop")  # most end on EOS, not all
    assert steps < planned_steps
    assert served(requests, True, batching="static")[0] == ended
    # With no request waiting (4 requests, 4 slots) no chunk ends early: the same steps either way.
    few = requests[:4]
    assert any(reason == "stop" for _, reason in served(few, True)[0])
    assert served(few, True) == served(few, False)


def test_stop_sequences_cut_the_output(sched):
    free = sched.generate([gen([70, 71], 16)])[0].tokens
    stop = tuple(free[5:7])
    first = next(i for i in range(len(free) - 1) if tuple(free[i : i + 2]) == stop)
    g = sched.generate([gen([70, 71], 16, stop=((999,), stop))])[0]
    assert g.tokens == free[:first] and g.finish_reason == "stop"


def test_a_stop_sequence_ends_its_slot_on_device_for_waiting_requests(sched):
    # 8 requests for 4 slots, each stopping a few tokens in, with a budget of 20: the slots are done on
    # device when the stop sequence is produced, so each chunk ends there and the waiting requests are
    # admitted at once. Matched only on the host, each chunk would run its full 8 steps.
    sampled = dict(temperature=1.0, seed=4)  # the same tokens for all 8 (a greedy random model repeats one)
    free = sched.generate([gen([70, 71], 20, **sampled)])[0].tokens
    stop = tuple(free[3:5])
    first = next(i for i in range(len(free) - 1) if tuple(free[i : i + 2]) == stop)
    before = dict(sched.stats)
    results = sched.generate([gen([70, 71], 20, stop=(stop,), **sampled) for _ in range(8)])
    assert all(g.tokens == free[:first] and g.finish_reason == "stop" for g in results)
    steps = sched.stats["steps"] - before["steps"]
    assert steps <= 2 * (first + 1) + 1, steps  # two rounds of first + 1 steps each (the first token: prefill)
    assert sched.stats["tokens"] - before["tokens"] == 8 * (first + 2)  # read up to the stop, not the budget


def admitted_order(sched, requests):
    """The indices of ``requests`` in the order the scheduler finishes them (all are submitted at once)."""
    finished = []
    tickets = [sched.submit(r) for r in requests]
    for i, t in enumerate(tickets):
        t.add_done_callback(lambda _, i=i: finished.append(i))
    while sched.busy():
        sched.run_once()
    return finished


@pytest.mark.parametrize("scheduler", ["fair", "fifo"])
def test_a_flooding_task_does_not_starve_another(sched, scheduler):
    # 24 requests of one task queued before 4 of another, for 4 slots, each of the same length. Fair: the
    # flooding task may hold its share of the slots and a slack (2 + 1) but not all 4, so the other task
    # always has a slot while it waits: its 4 requests are answered at least one in every 4, all among the
    # first 16. First in, first out: they wait for the whole flood (kept to show what fairness changes).
    flood = [gen([40 + i], 6) for i in range(24)]
    small = [gen([90 + i], 6, task="echo") for i in range(4)]
    sched.scheduler = scheduler
    try:
        order = admitted_order(sched, flood + small)
    finally:
        sched.scheduler = "fair"
    rank = sorted(order.index(24 + i) for i in range(4))
    if scheduler == "fair":
        assert rank[-1] < 16, order
    else:
        assert rank == [24, 25, 26, 27], order


def test_priority_orders_admission(sched):
    low = [gen([40 + i], 6, priority=-1) for i in range(6)]
    high = [gen([60 + i], 6, task="echo", priority=5) for i in range(4)]
    normal = [gen([80 + i], 6) for i in range(4)]
    order = admitted_order(sched, low + normal + high)
    assert sorted(order[:4]) == [10, 11, 12, 13]  # the high-priority ones first, though they came last
    assert sorted(order[4:8]) == [6, 7, 8, 9] and sorted(order[8:]) == [0, 1, 2, 3, 4, 5]


def test_a_request_past_its_deadline_is_cancelled_and_answered_so(sched):
    long = [sched.submit(gen([40 + i], 25)) for i in range(4)]  # every slot busy for 24 steps
    late = sched.submit(gen([70], 5, deadline_ms=1.0))  # waits for a slot past its deadline
    running = sched.submit(gen([71], 25, task="echo", deadline_ms=60_000.0))
    sched.run_once()
    time.sleep(0.01)
    while sched.busy():
        sched.run_once()
    with pytest.raises(DeadlineExceeded, match=r"passed its deadline_ms of 1 \("):
        late.wait(0)
    assert all(len(t.wait(0).tokens) == 25 for t in long + [running])
    # A running request is cancelled too, and its slot freed.
    expiring = sched.submit(gen([72], 25, deadline_ms=30.0))
    sched.run_once()
    assert any(sched.slots)
    time.sleep(0.05)
    sched.run_once()
    with pytest.raises(DeadlineExceeded, match="deadline_ms of 30"):
        expiring.wait(0)
    while sched.busy():
        sched.run_once()
    assert not any(sched.slots)


def test_admission_control(sched):
    with pytest.raises(ValueError, match="prompts take 1 to 31 tokens"):
        sched.submit(Request(task="spell", prompt=[5] * 32))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        sched.submit(Request(task="nope", prompt=[5]))
    sched.max_queue = 2
    try:
        tickets = [sched.submit(gen([1], 2)) for _ in range(2)]
        with pytest.raises(QueueFull):
            sched.submit(gen([1], 2))
    finally:
        sched.max_queue = 1024
    while sched.busy():
        sched.run_once()
    assert all(len(t.wait().tokens) == 2 for t in tickets)


def test_cancel_frees_the_slot(sched):
    long = sched.submit(gen([33], 25))
    queued = [sched.submit(gen([34 + i], 25)) for i in range(4)]  # the fifth waits for a slot
    sched.run_once()
    assert sum(s is not None for s in sched.slots) == 4
    sched.cancel(queued[-1])  # still queued: answered at once
    sched.cancel(long)  # in a slot: freed at the next iteration
    with pytest.raises(Cancelled):
        queued[-1].wait(0)
    sched.run_once()
    with pytest.raises(Cancelled):
        long.wait(0)
    assert sum(s is not None for s in sched.slots) == 3
    while sched.busy():
        sched.run_once()
    assert all(len(t.wait().tokens) == 25 for t in queued[:-1])


@both_engines
def test_no_compilation_after_warm_up_across_a_long_mixed_workload(sched):
    rng = np.random.default_rng(0)
    traces = dict(sched.engine.traces)
    with counting_compilations() as compiled:
        for round_ in range(6):
            requests = []
            for i in range(int(rng.integers(3, 12))):
                length = int(rng.integers(1, 30))  # both buckets
                prompt = [1] + rng.integers(4, 200, length - 1).tolist()
                if rng.random() < 0.3:
                    requests.append(Request(task="lang", prompt=prompt))
                else:
                    requests.append(
                        Request(
                            task=str(rng.choice(["spell", "echo"])),
                            prompt=prompt,
                            max_new_tokens=int(rng.integers(1, 40)),
                            temperature=float(rng.choice([0.0, 0.8])),
                            top_k=int(rng.integers(0, 5)),
                            top_p=float(rng.choice([1.0, 0.9])),
                            seed=round_ * 100 + i,
                            stop=((int(rng.integers(4, 200)),),),
                        )
                    )
            tickets = sched.serve(requests, batching="static" if round_ == 3 else None)
            assert all(t.done() for t in tickets)
            if round_ == 4:
                t = sched.submit(gen([5], 30))
                sched.run_once()
                sched.cancel(t)
                sched.run_once()
    assert compiled == [] and sched.engine.traces == traces


def test_chunks_of_steps_change_no_output():
    # A request that ends mid-chunk (EOS on device, a stop sequence or its budget on the host) gets
    # exactly the tokens it gets from one step a call; the extra steps of its chunk are dropped.
    model = MultiTaskModel(CFG, rngs=nnx.Rngs(1))
    mesh = make_mesh("data=1", jax.devices()[:1])
    sampled = dict(temperature=1.0, seed=4)
    free = scheduler_over(model, mesh, max_batch=4, prefill_batch=2, allowed_tokens=NO_EOS, eos_id=EOS, pad_id=0)
    run = free.generate([gen([70, 71], 20, **sampled)])[0].tokens
    end = next(i for i in range(3, 20) if run[i] not in run[:i])  # its first appearance ends the request
    stop = tuple(run[1:3])
    cut = next(i for i in range(20) if tuple(run[i : i + 2]) == stop)
    requests = [
        gen([70, 71], 20, **sampled),
        gen([70, 71], 20, stop=(stop,), **sampled),
        gen([70, 71], 20, task="echo", temperature=0.9, top_k=4, seed=2),
        gen([9], 13, temperature=1.0, top_p=0.8, seed=5),
        gen([60 + i for i in range(20)], 9),
    ]
    outputs = {}
    for steps in (1, 8):
        sched = scheduler_over(
            model,
            mesh,
            max_batch=4,
            prefill_batch=2,
            allowed_tokens=NO_EOS,
            eos_id=run[end],
            pad_id=0,
            steps_per_call=steps,
        )
        outputs[steps] = [(g.tokens, g.finish_reason) for g in sched.generate(requests)]
    assert outputs[1] == outputs[8]
    assert outputs[8][0] == (run[:end], "stop")
    assert outputs[8][1] == (run[:cut], "stop")


def test_any_of_several_eos_ids_ends_a_generation_on_device():
    # A model's generation config may list several EOS ids (Llama 3: <|end_of_text|>, <|eot_id|>). Whichever
    # comes first ends the request, on the host and on the device (the slot is done there, not left running).
    model = MultiTaskModel(CFG, rngs=nnx.Rngs(1))
    mesh = make_mesh("data=1", jax.devices()[:1])
    free = scheduler_over(model, mesh, max_batch=4, prefill_batch=2, allowed_tokens=NO_EOS, eos_id=EOS, pad_id=0)
    run = free.generate([gen([70, 71], 20, temperature=1.0, seed=4)])[0].tokens
    news = [i for i in range(1, 20) if run[i] not in run[:i]]  # first appearances
    first, second = news[1], news[2]
    sched = scheduler_over(
        model, mesh, max_batch=4, prefill_batch=2, allowed_tokens=NO_EOS, eos_id=(run[second], run[first]), pad_id=0
    )
    out = sched.generate([gen([70, 71], 20, temperature=1.0, seed=4)])[0]
    assert (out.tokens, out.finish_reason) == (run[:first], "stop")
    assert sched.stats["steps"] == first  # its chunk ended on device at that token, the budget (20) far from spent


def test_steps_per_call_must_be_positive():
    model = MultiTaskModel(CFG, rngs=nnx.Rngs(1))
    mesh = make_mesh("data=1", jax.devices()[:1])
    with pytest.raises(ValueError, match="steps_per_call 0 must be at least 1"):
        scheduler_over(model, mesh, max_batch=4, allowed_tokens=NO_EOS, eos_id=EOS, pad_id=0, steps_per_call=0)


def test_background_thread_serves_concurrent_submissions(sched):
    sched.start()
    try:
        tickets = [sched.submit(gen([60 + i], 3 + i)) for i in range(6)]
        results = [t.wait(60) for t in tickets]
    finally:
        sched.stop()
    assert [len(g.tokens) for g in results] == [3 + i for i in range(6)]
    assert all(g.ttft_ms <= g.latency_ms for g in results)


def test_a_flood_fills_the_queue_but_never_refuses_another_tasks_trickle(sched):
    # 8 places: the flood takes them all, then is refused (429); the trickle is still admitted up to its share
    # (8 over 2 tasks), and only past it refused. A request of several prompts is admitted or refused whole.
    sched.max_queue = 8
    try:
        flood = [sched.submit(gen([40 + i], 3)) for i in range(8)]
        with pytest.raises(QueueFull, match="task 'spell' holds its share of it"):
            sched.submit(gen([50], 3))
        trickle = [sched.submit(gen([60 + i], 3, task="echo")) for i in range(4)]
        with pytest.raises(QueueFull, match="task 'echo' holds its share"):
            sched.submit(gen([70], 3, task="echo"))
        waiting = len(sched.queue)
        with pytest.raises(QueueFull):
            sched.submit_all([gen([80], 3, task="lang"), gen([81], 3, task="spell")])  # spell's part is over
        assert len(sched.queue) == waiting == 12  # nothing of the refused request was queued
        with pytest.raises(ValueError, match="9 prompts in one request are more than the queue holds"):
            sched.submit_all([gen([90], 3, task="lang")] * 9)
    finally:
        sched.max_queue = 1024
    whole = sched.submit_all([gen([91 + i], 2, task="echo") for i in range(3)])
    while sched.busy():
        sched.run_once()
    assert all(len(t.wait().tokens) == 3 for t in flood + trickle)
    assert all(len(t.wait().tokens) == 2 for t in whole)
    assert all(sched.table.in_use(row) == 0 for row in range(3))  # every finished request gave its row back


def test_abort_cancels_what_waits_and_what_runs(sched):
    running = [sched.submit(gen([40 + i], 20)) for i in range(4)]
    sched.run_once()
    waiting = sched.submit(gen([60], 5))
    sched.abort("the server shut down")
    for ticket in [*running, waiting]:
        with pytest.raises(Cancelled, match="the server shut down"):
            ticket.wait(0)
    assert not sched.busy() and not any(sched.slots)
    assert len(sched.generate([gen([61], 4)])[0].tokens) == 4  # and it serves on
