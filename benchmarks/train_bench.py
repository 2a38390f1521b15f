"""Training throughput: tokens/s and MFU of the train step, against transformers GPT-2 on this CPU.

    python benchmarks/train_bench.py                          # tiny and small, every comparison
    python benchmarks/train_bench.py --presets small --no-torch --json out.json

For each preset it times the jitted generation train step (the one train.py
runs: forward, backward, AdamW) on one device at a fixed batch and width, and
prints tokens/s, the step time, model FLOPs a step and MFU against the matmul
peak measured in the same run. Beside it, taking turns window by window:
Hugging Face GPT-2 in PyTorch of the same width, depth, batch and sequence
length (an AdamW step of its own). Then the step time while an asynchronous
checkpoint save is in flight; the small preset on a 2x2x2 mesh of 8 virtual
CPU devices (a child process: the device count is fixed when JAX starts); and
the small preset without ``mtl.perf.tune_host_allocator`` (a child process).
Every token of the batch counts, for both frameworks alike; the loss mask is
all ones.

The base preset is left out by default: 315M parameters take about 10 s a step
at batch 2 on 2 cores. ``--presets base --batch 2 --steps 1 --windows 1`` runs it.
Results and what they mean: docs/training_bench.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import time_windows  # noqa: E402  (this folder's)

from mtl import perf  # noqa: E402

MESH_2X2X2 = "data=2,fsdp=2,tensor=2"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="comma-separated presets (tiny, small, base)")
    p.add_argument("--steps", type=int, default=4, help="steps in one timed window")
    p.add_argument("--windows", type=int, default=7, help="timed windows; the median window is reported")
    p.add_argument("--seq-len", type=int, default=64, help="tokens a row (train.py trims batches to 32 or 64)")
    p.add_argument("--batch", type=int, default=0, help="rows a step; 0: each preset's train.batch_size")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers GPT-2 comparison")
    p.add_argument("--no-mesh", action="store_true", help="skip the 2x2x2 run on 8 virtual devices")
    p.add_argument("--no-checkpoint", action="store_true", help="skip the save-in-flight measurement")
    p.add_argument("--no-allocator", action="store_true", help="skip the run without allocator tuning")
    p.add_argument("--no-packing", action="store_true", help="skip the demo mixture, packed against unpacked")
    p.add_argument("--mixture-steps", type=int, default=16, help="demo-mixture steps in one timed window (packing)")
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    # Internal: the child processes' configuration.
    p.add_argument("--child-mesh", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-default-allocator", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-torch", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- JAX --------------------------------------------------------------------


def model_config(preset: str):
    """The preset's model with the demo's heads: one generation task (timed) and one classifier."""
    from mtl import config as C
    from mtl.config import HeadConfig

    cfg = C.preset(preset)
    heads = (HeadConfig("g2p", "generate"), HeadConfig("langid", "classify", 10))
    return dataclasses.replace(cfg.model, heads=heads), cfg.train


def make_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """A generation batch of random byte tokens; every position is a target."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, min(vocab, 260), (batch, seq_len + 1), dtype=np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq_len), np.float32),
        "task_id": np.zeros(batch, np.int32),
    }


def interleaved(runners: list[Runner], windows: int, steps: int) -> list[list[float]]:
    """Each runner's window times, the runners taking turns window by window.

    On a shared machine the load drifts; alternating keeps a ratio of two
    runners' medians fair where back-to-back runs would not be.
    """
    times = [[] for _ in runners]
    for _ in range(windows):
        for runner, runner_times in zip(runners, times):
            runner_times += time_windows(runner.step, 1, steps, runner.sync)
    return times


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


@dataclasses.dataclass
class Runner:
    """One compiled and warmed-up train step: ``step()`` runs it, ``sync()`` waits for it."""

    step: object
    sync: object
    info: dict


def compiled_step(model_cfg, train_cfg, mesh, host_batch: dict, task: str = "g2p"):
    """A generation train step on ``mesh``, compiled and run once: (step, sync, holder, compile seconds).

    ``step()`` runs it on ``host_batch`` (put on the mesh once), ``sync()`` waits
    for it, ``holder["state"]`` is the train state it updates.
    """
    import jax

    from mtl import training

    graphdef, state, shardings = training.create_train_state(model_cfg, train_cfg, mesh)
    holder = {"state": state}
    with jax.set_mesh(mesh):
        step_fn = training.compile_train_step(graphdef, shardings, mesh, host_batch, task=task, kind="generate")
        device_batch = training.put_batch(host_batch, mesh)

    def step():
        with jax.set_mesh(mesh):
            holder["state"], holder["metrics"] = step_fn(holder["state"], device_batch)

    def sync():
        jax.block_until_ready(holder["state"])

    t0 = time.perf_counter()
    step()
    sync()
    return step, sync, holder, time.perf_counter() - t0


def jax_runner(preset: str, batch: int, seq_len: int, mesh_spec: str = "") -> Runner:
    """The preset's generation train step, compiled and warmed up on a one-device (or ``mesh_spec``) mesh."""
    import jax

    import sharding
    from mtl.model import count_params

    model_cfg, train_cfg = model_config(preset)
    mesh = sharding.make_mesh(mesh_spec) if mesh_spec else sharding.make_mesh("", jax.devices()[:1])
    step, sync, holder, compile_s = compiled_step(
        model_cfg, train_cfg, mesh, make_batch(batch, seq_len, model_cfg.vocab_size)
    )
    time_windows(step, 1, 2, sync)  # warm caches and the allocator after the compile
    tokens = batch * seq_len
    info = {
        "preset": preset,
        "dtype": model_cfg.dtype,
        "mesh": mesh_spec or "1 device",
        "devices": mesh.devices.size,
        "batch": batch,
        "seq_len": seq_len,
        "params": count_params(holder["state"]["model"]),
        "compile_s": compile_s,
        "flops_per_step": perf.train_flops_per_token(model_cfg, seq_len) * tokens,
        "flops_per_step_conservative": perf.train_flops_per_token(model_cfg, seq_len, conservative=True) * tokens,
        "holder": holder,
    }
    return Runner(step, sync, info)


def summarise(info: dict, times: list[float]) -> dict:
    result = {k: v for k, v in info.items() if k != "holder"}
    result.update(step_s=median(times), step_s_best=min(times))
    result["tokens_per_s"] = info["batch"] * info["seq_len"] / result["step_s"]
    if "holder" in info:
        result["loss"] = float(info["holder"]["metrics"]["loss"])
    return result


def measure_save(runner: Runner, windows: int, steps: int) -> dict:
    """Step time in windows that start with an async checkpoint save, against windows that do not.

    Also how long ``save()`` holds the loop, and how long a save takes to
    finish with no training beside it.
    """
    from mtl.checkpoint import Checkpoints

    holder = runner.info["holder"]
    plain, saving, stalls, alone = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = Checkpoints(folder, keep=2)
        for i in range(windows):
            plain += time_windows(runner.step, 1, steps, runner.sync)
            t0 = time.perf_counter()
            checkpoints.save(2 * i, holder["state"]["model"], holder["state"]["optimizer"], {"step": 2 * i})
            stalls.append(time.perf_counter() - t0)
            saving += time_windows(runner.step, 1, steps, runner.sync)
            checkpoints.wait()  # untimed: the next window starts with no save running
            t0 = time.perf_counter()
            checkpoints.save(2 * i + 1, holder["state"]["model"], holder["state"]["optimizer"], {"step": 2 * i + 1})
            checkpoints.wait()
            alone.append(time.perf_counter() - t0)
        checkpoints.close()
    return {
        "step_s": median(plain),
        "step_s_saving": median(saving),
        "save_call_s": median(stalls),
        "save_alone_s": median(alone),
    }


# --- the demo mixture, packed and unpacked -----------------------------------------


MIXTURE_CASES = (("unpacked", False, "mtl"), ("packed", True, "mtl"), ("packed, xla attention", True, "xla"))


def mixture_runners(preset: str, steps: int) -> list[Runner]:
    """train.py's own steps on the demo mixture (g2p, langid): one example a row, packed, and packed with
    ``jax.nn.dot_product_attention``'s XLA attention in place of mtl's own (``MIXTURE_CASES``).

    Both runners train the same ``steps`` consecutive steps the mixture sampler
    draws, over and over; ``step()`` builds the next step's batch on the host
    (trimmed or packed, as train.py does), places it and runs the step, so a
    window of ``steps`` steps is one pass. Every shape is compiled before timing.
    """
    import jax

    import sharding
    import tasks
    from mtl import trainer, training

    plan = trainer.prepare(trainer.configure(preset, tasks="g2p,langid"), log=lambda _: None)
    cfg, mesh = plan.config, sharding.make_mesh("", jax.devices()[:1])
    sizes = {d.name: len(d.splits["train"]) for d in plan.data}
    sampler = tasks.MixtureSampler(sizes, tasks.mixture_rates(cfg.train.mixture, sizes), cfg.train.batch_size, 0)
    draws = [sampler.batch_at(step) for step in range(steps)]
    kinds = {d.name: d.kind for d in plan.data}
    runners = []
    for case, pack, attention in MIXTURE_CASES:
        run_cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, attention=attention),
            train=dataclasses.replace(cfg.train, pack=pack),
        )
        batches = trainer.TrainBatches(run_cfg, plan.data, mesh)
        graphdef, state, shardings = training.create_train_state(run_cfg.model, run_cfg.train, mesh)
        holder = {"state": state, "next": 0}
        step_fns = {}

        def step(batches=batches, holder=holder, step_fns=step_fns, graphdef=graphdef, shardings=shardings):
            name, indices = draws[holder["next"] % steps]
            holder["next"] += 1
            batch, rows, _ = batches(name, indices)
            with jax.set_mesh(mesh):
                if name not in step_fns:
                    step_fns[name] = training.compile_train_step(
                        graphdef, shardings, mesh, batch, task=name, kind=kinds[name]
                    )
                holder["state"], holder["metrics"] = step_fns[name](holder["state"], training.put_batch(batch, mesh))

        def sync(holder=holder):
            jax.block_until_ready(holder["state"])

        real = computed = flops = 0
        shapes = set()
        for name, indices in draws:
            batch, rows, tokens = batches(name, indices)
            width = batch["tokens"].shape[1]
            real, computed = real + tokens, computed + rows * width
            flops += perf.train_flops_per_token(run_cfg.model, width) * rows * width
            shapes.add((name, rows, width))
        t0 = time.perf_counter()
        time_windows(step, 1, steps, sync)  # compiles every shape of the pass
        compile_s = time.perf_counter() - t0
        info = {
            "case": case,
            "pack": pack,
            "attention": attention,
            "steps": steps,
            "batch": cfg.train.batch_size,
            "real_tokens": real,
            "computed_tokens": computed,
            "flops": flops,
            "shapes": len(shapes),
            "first_pass_s": compile_s,
            "holder": holder,
        }
        runners.append(Runner(step, sync, info))
    return runners


def summarise_mixture(info: dict, times: list[float]) -> dict:
    result = {k: v for k, v in info.items() if k != "holder"}
    pass_s = median(times) * info["steps"]
    result.update(step_s=median(times), real_tokens_per_s=info["real_tokens"] / pass_s)
    result["padding"] = 1 - info["real_tokens"] / info["computed_tokens"]
    result["model_flops_per_s"] = info["flops"] / pass_s
    return result


# --- PyTorch / transformers ----------------------------------------------------


def gpt2_config(model_cfg, seq_len: int):
    """GPT-2 of the preset's width, depth and heads, with the MLP width that matches SwiGLU's parameters.

    SwiGLU has three D x F matrices, GPT-2's MLP two D x F' ones: F' = 3F/2
    gives both the same MLP parameters and FLOPs. GPT-2 has no grouped-query
    attention, so its attention has 4 D^2 weights where ours has
    D (2 N H + 2 K H): it does a little more work a token, not less.
    """
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=model_cfg.vocab_size,
        n_positions=max(seq_len, model_cfg.max_len),
        n_embd=model_cfg.d_model,
        n_layer=model_cfg.n_layers,
        n_head=model_cfg.n_heads,
        n_inner=3 * model_cfg.d_ff // 2,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=None,  # GPT-2's 50256 lies outside this vocabulary; no generation here
        eos_token_id=None,
    )


def gpt2_flops_per_token(config, seq_len: int) -> float:
    """``train_flops_per_token``'s count for GPT-2: 6 a weight, the LM head, the whole attention square."""
    d, layers = config.n_embd, config.n_layer
    per_layer = 4 * d * d + 2 * d * config.n_inner
    return 6.0 * (layers * per_layer + config.vocab_size * d) + 12.0 * layers * seq_len * d


def torch_runner(preset: str, batch: int, seq_len: int) -> Runner:
    """A transformers GPT-2 train step (masked cross-entropy, clipping, AdamW) on the same batch, warmed up."""
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model_cfg, train_cfg = model_config(preset)
    config = gpt2_config(model_cfg, seq_len)
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.learning_rate, betas=(0.9, 0.95), weight_decay=train_cfg.weight_decay
    )
    host_batch = make_batch(batch, seq_len, model_cfg.vocab_size)
    tokens = torch.from_numpy(host_batch["tokens"]).long()
    targets = torch.from_numpy(host_batch["targets"]).long()
    mask = torch.from_numpy(host_batch["loss_mask"])
    losses = []

    def step():
        logits = model(input_ids=tokens).logits  # [B, T, V]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (nll * mask.flatten()).sum() / mask.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        losses.append(loss.detach())

    def sync():  # eager PyTorch on the CPU: every step has finished when it returns
        pass

    time_windows(step, 1, 3, sync)
    info = {
        "framework": f"transformers {transformers.__version__} GPT-2, torch {torch.__version__}",
        "attention": config._attn_implementation,
        "threads": torch.get_num_threads(),
        "n_inner": config.n_inner,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "seq_len": seq_len,
        "flops_per_step": gpt2_flops_per_token(config, seq_len) * batch * seq_len,
    }
    return Runner(step, sync, info)


# --- child processes -------------------------------------------------------------


def run_child(args, extra: list[str], env: dict[str, str]) -> dict | None:
    """Runs this script for one configuration in a fresh process; returns its JSON result, or None."""
    command = [sys.executable, os.path.abspath(__file__), "--presets", "small", "--seq-len", str(args.seq_len)]
    command += ["--steps", str(args.steps), "--windows", str(args.windows)]
    if args.batch:
        command += ["--batch", str(args.batch)]
    done = subprocess.run(command + extra, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode:
        print(f"child {' '.join(extra)} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_child(args, preset: str, batch: int) -> dict | None:
    """The GPT-2 baseline in a process of its own: the default allocator; JAX is imported here but never started."""
    command = [sys.executable, os.path.abspath(__file__), "--child-torch", preset, "--seq-len", str(args.seq_len)]
    command += ["--steps", str(args.steps), "--windows", str(args.windows), "--batch", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        print(f"torch baseline failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(args) -> int:
    """One small-preset measurement, printed as a JSON line for the parent."""
    if args.child_torch:
        runner = torch_runner(args.child_torch, args.batch, args.seq_len)
        print(json.dumps(summarise(runner.info, time_windows(runner.step, args.windows, args.steps, runner.sync))))
        return 0
    if not args.child_default_allocator:
        perf.tune_host_allocator()
    model_cfg, train_cfg = model_config("small")
    batch = args.batch or train_cfg.batch_size
    runner = jax_runner("small", batch, args.seq_len, mesh_spec=args.child_mesh or "")
    print(json.dumps(summarise(runner.info, time_windows(runner.step, args.windows, args.steps, runner.sync))))
    return 0


# --- report ----------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_mesh is not None or args.child_default_allocator or args.child_torch:
        return child_main(args)
    tuned = perf.tune_host_allocator()  # before JAX starts its threads; see docs/training_bench.md

    import jax

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    cpu = _cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"host allocator tuned (perf.tune_host_allocator): {tuned}")
    peaks = {"float32": perf.matmul_peak("float32")}
    report = {"machine": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "allocator_tuned": tuned}

    rows = []
    for preset in presets:
        model_cfg, train_cfg = model_config(preset)
        batch = args.batch or train_cfg.batch_size
        runners = [jax_runner(preset, batch, args.seq_len)]
        # The baseline runs in a child of its own between two halves of ours, so neither shares a
        # process (or this one's allocator tuning) with the other and load drift splits evenly.
        times = time_windows(runners[0].step, (args.windows + 1) // 2, args.steps, runners[0].sync)
        torch_result = None if args.no_torch else torch_child(args, preset, batch)
        times += time_windows(runners[0].step, args.windows // 2, args.steps, runners[0].sync)
        result = summarise(runners[0].info, times)
        if torch_result is not None:
            result["torch"] = torch_result
        if not args.no_checkpoint:
            result["checkpoint"] = measure_save(runners[0], args.windows, args.steps)
        rows.append(result)
        del runners
    # The peak again at the end, the best of both: a disturbed measurement reads low and would inflate MFU.
    for dtype in {"float32", *(r["dtype"] for r in rows)}:
        peaks[dtype] = max(peaks.get(dtype, 0.0), perf.matmul_peak(dtype))
    report["matmul_peak"] = peaks

    measured = ", ".join(f"{peak / 1e9:.1f} GFLOP/s {dtype}" for dtype, peak in sorted(peaks.items()))
    print(f"matmul peak (2048^2, best of 10, at the start and the end of the run): {measured}")
    print(
        f"\nsequence length {args.seq_len}; median of {args.windows} windows of {args.steps} steps; "
        "torch in a child process of its own, between two halves of ours\n"
    )
    header = f"{'preset':<8}{'batch':>6}{'params':>9}{'step ms':>9}{'tokens/s':>10}{'GFLOP/step':>11}"
    print(header + f"{'MFU':>7}{'MFU cons.':>10}{'torch tok/s':>12}{'per token':>10}{'per FLOP':>9}")
    for r in rows:
        peak = peaks[r["dtype"]]
        r["mfu"] = r["flops_per_step"] / r["step_s"] / peak
        r["mfu_conservative"] = r["flops_per_step_conservative"] / r["step_s"] / peak
        line = (
            f"{r['preset']:<8}{r['batch']:>6}{r['params'] / 1e6:>8.2f}M{r['step_s'] * 1e3:>9.1f}"
            f"{r['tokens_per_s']:>10.0f}{r['flops_per_step'] / 1e9:>11.2f}"
            f"{r['mfu']:>7.1%}{r['mfu_conservative']:>10.1%}"
        )
        if "torch" in r:
            t = r["torch"]
            t["mfu"] = t["flops_per_step"] / t["step_s"] / peaks["float32"]
            r["torch_ratio"] = r["tokens_per_s"] / t["tokens_per_s"]
            # Model FLOPs a second, each model's own count (GPT-2's attention is wider: it does more a token).
            r["torch_ratio_per_flop"] = (r["flops_per_step"] / r["step_s"]) / (t["flops_per_step"] / t["step_s"])
            line += f"{t['tokens_per_s']:>12.0f}{r['torch_ratio']:>9.2f}x{r['torch_ratio_per_flop']:>8.2f}x"
        print(line)
    for r in rows:
        if "torch" in r:
            t = r["torch"]
            print(
                f"torch {r['preset']}: {t['framework']}, {t['attention']} attention, {t['threads']} threads, "
                f"n_inner {t['n_inner']}, {t['params'] / 1e6:.2f}M params, step {t['step_s'] * 1e3:.1f} ms, "
                f"{t['flops_per_step'] / 1e9:.2f} GFLOP/step ({t['flops_per_step'] / r['flops_per_step']:.3f}x ours), "
                f"MFU {t['mfu']:.1%} (its own FLOPs); in a child process, default allocator"
            )
    for r in rows:
        if "checkpoint" in r:
            c = r["checkpoint"]
            print(
                f"async save ({r['preset']}): step {c['step_s'] * 1e3:.1f} ms without, "
                f"{c['step_s_saving'] * 1e3:.1f} ms with a save in flight ({c['step_s_saving'] / c['step_s']:.2f}x); "
                f"save() returns in {c['save_call_s'] * 1e3:.1f} ms; "
                f"a save alone takes {c['save_alone_s'] * 1e3:.0f} ms"
            )
    report["presets"] = rows

    if not args.no_packing and "small" in presets:
        runners = mixture_runners("small", args.mixture_steps)
        times = interleaved(runners, args.windows, args.mixture_steps)
        cases = {r.info["case"]: summarise_mixture(r.info, t) for r, t in zip(runners, times)}
        del runners
        unpacked, packed = cases["unpacked"], cases["packed"]
        packed["ratio_real_tokens_per_s"] = packed["real_tokens_per_s"] / unpacked["real_tokens_per_s"]
        report["mixture"] = cases
        print(
            f"\ndemo mixture (small, g2p and langid as train.py draws them, {args.mixture_steps} steps of "
            f"{unpacked['batch']} examples, median of {args.windows} passes, the two taking turns):"
        )
        for name, m in cases.items():
            print(
                f"  {name:<22} {m['real_tokens_per_s']:>8.0f} real tokens/s  {m['step_s'] * 1e3:>6.1f} ms/step  "
                f"padding {m['padding']:.0%}  {m['model_flops_per_s'] / 1e9:.1f} GFLOP/s  {m['shapes']} shapes"
            )
        print(f"  packed/unpacked real tokens/s: {packed['ratio_real_tokens_per_s']:.2f}x")
        xla = cases["packed, xla attention"]
        print(f"  packed, mtl's attention / XLA's: {packed['real_tokens_per_s'] / xla['real_tokens_per_s']:.2f}x")

    small = next((r for r in rows if r["preset"] == "small"), None)
    if not args.no_mesh:
        mesh = run_child(args, ["--child-mesh", MESH_2X2X2], {"JAX_NUM_CPU_DEVICES": "8"})
        if mesh is not None:
            report["mesh_2x2x2"] = mesh
            line = f"small on {MESH_2X2X2} (8 virtual devices): {mesh['tokens_per_s']:.0f} tokens/s"
            if small is not None and small["batch"] == mesh["batch"]:
                mesh["ratio_to_one_device"] = mesh["tokens_per_s"] / small["tokens_per_s"]
                line += f", {mesh['ratio_to_one_device']:.2f}x the one-device run"
            print(line)
    if not args.no_allocator and tuned:
        plain = run_child(args, ["--child-default-allocator", "--child-mesh", ""], {})
        if plain is not None:
            report["default_allocator"] = plain
            line = f"small without allocator tuning: {plain['tokens_per_s']:.0f} tokens/s"
            if small is not None and small["batch"] == plain["batch"]:
                plain["ratio_to_tuned"] = plain["tokens_per_s"] / small["tokens_per_s"]
                plain["mfu"] = plain["flops_per_step"] / plain["step_s"] / peaks["float32"]
                line += f", {plain['ratio_to_tuned']:.2f}x the tuned run (MFU {plain['mfu']:.1%})"
            print(line)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
