"""Pretrained models on this CPU: import time and peak host memory, and training tokens/s against transformers.

    python benchmarks/pretrained_bench.py                 # a ~100M Llama: import, then mtl and PyTorch training
    python benchmarks/pretrained_bench.py --json out.json --batch 4 --seq-len 128 --steps 3 --windows 3
    python benchmarks/pretrained_bench.py --folder SMOLLM2 --adapters 8 --targets q,v --batch 16 --seq-len 128

1. **Import.** transformers builds a random Llama-shaped model (f32, tied
   embeddings, about 100M parameters; no download) and saves it with
   ``save_pretrained``. A child process then runs ``mtl.hf_import.read_config``
   and ``load`` onto a one-device mesh, timing it and sampling its resident
   memory every 2 ms (``/proc/self/statm``): peak host memory above the
   pre-import baseline, against the bytes of the safetensors files.
2. **Training.** The generation train step mtl runs (forward, backward,
   clipping, AdamW; ``mtl.training.compile_train_step``) on the imported
   model's config, and transformers' ``LlamaForCausalLM`` loaded from the same
   folder with a PyTorch train step of the same batch and length (masked
   cross-entropy, clipping, AdamW), each in a child process of its own, one
   after the other. PyTorch uses its own defaults for speed on the CPU: eager
   mode, SDPA attention, every core as an intra-op thread. Warm-up (mtl's
   compile, PyTorch's first steps) is excluded; each side reports the median of
   its timed windows. Weights do not change the speed, so mtl's side starts
   from its own initialisation of the same shapes.

3. **Adapters** (``--adapters R --targets q,v``): mtl trains rank-R LoRA
   adapters on those projections with the backbone frozen
   (``train.trainable=adapters``; adapters and the task's embedding train),
   against transformers' model wrapped by ``peft`` (``LoraConfig`` of the same
   rank, alpha 16 and targets ``q_proj``, ``v_proj``; AdamW over its trainable
   parameters), the same batch and length.

Results: docs/pretrained.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The model: Llama's shape at about 100M parameters (a SmolLM-135M-like width, fewer layers).
LLAMA = dict(
    vocab_size=32_000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="rows a training step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens a row")
    p.add_argument("--steps", type=int, default=2, help="steps in one timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--folder", help="an existing Hugging Face folder to use instead of building one")
    p.add_argument("--no-train", action="store_true", help="measure the import only (seconds, not minutes)")
    p.add_argument("--adapters", type=int, default=0, help="LoRA rank: train adapters only, against peft (0: all)")
    p.add_argument("--targets", default="q,v", help="the adapted projections (with --adapters)")
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    p.add_argument("--child", choices=("import", "mtl", "torch"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_folder(folder: str) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    model.save_pretrained(folder)
    return folder


def model_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict[str, int]:
    """Resident bytes by kind: RssAnon (the process's own memory) and RssFile (mapped files' pages, the safetensors)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, kb, _ = line.split()
                parts[name.rstrip(":")] = int(kb) * 1024
    return parts


def child_import(folder: str) -> dict:
    import dataclasses

    import jax
    import numpy as np

    from mtl import hf_import
    from mtl.config import HeadConfig
    from sharding import make_mesh

    mesh = make_mesh("data=1", jax.devices()[:1])
    jax.block_until_ready(jax.numpy.zeros(8) + 1)  # the runtime up before the baseline
    peak, stop = [rss_bytes()], threading.Event()
    baseline, base_parts = peak[0], rss_parts()
    peak_parts = dict(base_parts)

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            for name, value in rss_parts().items():
                peak_parts[name] = max(peak_parts[name], value)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    cfg = dataclasses.replace(hf_import.read_config(folder), heads=(HeadConfig("lm", "generate"),))
    graphdef, state = hf_import.load(folder, cfg, mesh)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], rss_bytes())
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    above = {name: peak_parts[name] - base_parts[name] for name in base_parts}  # each kind's own peak
    return {"import_s": seconds, "baseline_rss": baseline, "peak_rss": peak[0], "params": params, "peak_above": above}


def make_batch(batch: int, seq_len: int, vocab: int) -> dict:
    import numpy as np

    tokens = np.random.default_rng(0).integers(3, vocab, (batch, seq_len + 1), dtype=np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq_len), np.float32),
        "task_id": np.zeros(batch, np.int32),
    }


def child_mtl(folder: str, args) -> dict:
    import dataclasses

    import jax
    from timing import time_windows
    from train_bench import compiled_step  # this folder's: the same step

    from mtl import config as C
    from mtl import hf_import, perf
    from mtl.config import HeadConfig
    from sharding import make_mesh

    cfg = dataclasses.replace(
        hf_import.read_config(folder, max_len=args.seq_len), heads=(HeadConfig("lm", "generate"),)
    )
    train_cfg = C.preset("small").train
    if args.adapters:
        cfg = dataclasses.replace(cfg, adapter_rank=args.adapters, adapter_targets=args.targets)
        train_cfg = dataclasses.replace(train_cfg, trainable="adapters")
    mesh = make_mesh("data=1", jax.devices()[:1])
    host = make_batch(args.batch, args.seq_len, cfg.vocab_size)
    step, sync, _, compile_s = compiled_step(cfg, train_cfg, mesh, host, task="lm")
    time_windows(step, 1, 1, sync)  # warm-up after the compile
    times = time_windows(step, args.windows, args.steps, sync)
    flops = perf.train_flops_per_token(cfg, args.seq_len, trainable=train_cfg.trainable) * args.batch * args.seq_len
    return {"compile_s": compile_s, "step_s": sorted(times)[len(times) // 2], "times": times, "flops_per_step": flops}


def child_torch(folder: str, args) -> dict:
    import torch
    import transformers
    from timing import time_windows  # no JAX in the PyTorch process

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    if args.adapters:
        import peft

        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj"}
        names["down"] = "down_proj"
        lora = peft.LoraConfig(
            r=args.adapters, lora_alpha=16, lora_dropout=0.0, target_modules=[names[t] for t in args.targets.split(",")]
        )
        model = peft.get_peft_model(model, lora).train()
    train_cfg = __import__("mtl.config", fromlist=["preset"]).preset("small").train
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=train_cfg.learning_rate,
        betas=(0.9, 0.95),
        weight_decay=train_cfg.weight_decay,
    )
    host = make_batch(args.batch, args.seq_len, model.config.vocab_size)
    tokens, targets = torch.from_numpy(host["tokens"]).long(), torch.from_numpy(host["targets"]).long()
    mask = torch.from_numpy(host["loss_mask"]).flatten()

    def step():
        logits = model(input_ids=tokens).logits  # [B, T, V]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()

    time_windows(step, 1, 2, lambda: None)  # warm-up
    times = time_windows(step, args.windows, args.steps, lambda: None)
    return {
        "step_s": sorted(times)[len(times) // 2],
        "times": times,
        "framework": f"transformers {transformers.__version__}, torch {torch.__version__}"
        + (f", peft {__import__('peft').__version__}" if args.adapters else ""),
        "attention": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
    }


def run_child(kind: str, folder: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--folder", folder]
    command += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    command += ["--steps", str(args.steps), "--windows", str(args.windows)]
    command += ["--adapters", str(args.adapters), "--targets", args.targets]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"the {kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_training(args, ours: dict, theirs: dict) -> None:
    tokens = args.batch * args.seq_len
    what = f"adapters r{args.adapters} on {args.targets}" if args.adapters else "every weight"
    print(
        f"training {what}, batch {args.batch} x {args.seq_len} tokens, "
        f"median of {args.windows} windows of {args.steps}:"
    )
    mtl_tok_s = tokens / ours["step_s"]
    print(
        f"  mtl      {ours['step_s'] * 1e3:8.0f} ms/step  {mtl_tok_s:8.0f} tok/s  (compile {ours['compile_s']:.0f} s)"
    )
    print(
        f"  pytorch  {theirs['step_s'] * 1e3:8.0f} ms/step  {tokens / theirs['step_s']:8.0f} tok/s  "
        f"({theirs['framework']}, {theirs['attention']}, {theirs['threads']} threads)"
    )
    print(f"  mtl / pytorch tokens/s: {theirs['step_s'] / ours['step_s']:.2f}x")
    print(f"  load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        if args.child == "import":
            result = child_import(args.folder)
        elif args.child == "mtl":
            result = child_mtl(args.folder, args)
        else:
            result = child_torch(args.folder, args)
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or build_folder(os.path.join(tmp, "llama"))
        size = model_bytes(folder)
        imported = run_child("import", folder, args)
        above = imported["peak_rss"] - imported["baseline_rss"]
        print(
            f"import: {imported['params'] / 1e6:.1f}M parameters, {size / 2**20:.0f} MiB of safetensors, "
            f"{imported['import_s']:.2f} s; peak RSS above baseline {above / 2**20:.0f} MiB = {above / size:.2f}x"
        )
        parts = ", ".join(f"{k} {v / size:.2f}x" for k, v in imported["peak_above"].items())
        print(f"  of which, each at its own peak: {parts} (RssFile: the safetensors pages mapped while read)")
        if args.no_train:
            ours = theirs = None
        else:
            ours = run_child("mtl", folder, args)
            theirs = run_child("torch", folder, args)
    if ours is not None:
        report_training(args, ours, theirs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model_bytes": size, "import": imported, "mtl": ours, "torch": theirs, "args": vars(args)}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
