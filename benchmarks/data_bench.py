"""Data at real scale: a big classify file trained from the tokenized-data cache (issue 24).

    flock /work/bench.lock python benchmarks/data_bench.py --rows 10000000

Generates a classify JSONL of ``--rows`` rows (about 100 bytes a row) and one of
``--small`` rows in a temporary folder (removed at the end; free disk is
checked first), then measures, each in a process of its own:

- peak RSS of ``train.py --preset tiny`` training from each file, cold (the
  cache built in the same process) and warm (the cache reused);
- time to the first step, cold and warm (process start to step 1's metrics line);
- tokenization rows/s of the cache build against the tokenizer's own batch
  encoding of the same texts on the same cores (the limit), for the byte
  tokenizer and a byte-level BPE trained on the file's text;
- the same against a plain ``datasets`` pipeline: ``load_dataset("json")`` then
  ``map(batched=True, num_proc=CPUs)`` with the same encoding.

Prints one JSON object and, with ``--markdown``, the table of docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = (
    "alpha brick cloud dance eagle flame grape house ivory jelly koala lemon mango night ocean piano quilt river "
    "stone tiger umbra vivid whale xenon yacht zebra the of and a to in is was for on grüße été"
).split()


def generate(path: pathlib.Path, rows: int, seed: int = 0) -> None:
    """A classify file: 8 to 17 words and a row number as the input, one of 8 labels (about 100 bytes a row)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, rng.integers(8, 18))) for _ in range(50_000)]
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, rows, 500_000):
            n = min(500_000, rows - start)
            picks, labels = rng.integers(0, len(sentences), n), rng.integers(0, 8, n)
            f.write(
                "".join(
                    f'{{"input": "{sentences[p]} {start + i}", "label": "class{label}"}}\n'
                    for i, (p, label) in enumerate(zip(picks.tolist(), labels.tolist()))
                )
            )


def child_seconds(argv: list[str], env: dict, first_step: pathlib.Path | None = None) -> dict:
    """Runs a command: its wall time and output, when its first progress line came, and when the file
    ``first_step`` first held a line."""
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "out"
        with open(path, "a") as out:  # appends: reading it meanwhile never moves the child's writes
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
            first = progress = None
            while proc.poll() is None:
                if first is None and first_step is not None and first_step.exists() and first_step.stat().st_size:
                    first = time.perf_counter() - t0
                if progress is None and "tokenizing" in path.read_text(errors="replace"):
                    progress = time.perf_counter() - t0  # the build's first line, piped
                time.sleep(0.05)
            seconds = time.perf_counter() - t0
        text = path.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{text[-3000:]}")
    return {"seconds": seconds, "first_step_s": first, "first_progress_s": progress, "output": text}


def run_measured(argv: list[str], env: dict, first_step: pathlib.Path | None = None) -> dict:
    """``child_seconds`` and the command's peak RSS, from a wrapper that reports its child's ru_maxrss."""
    wrapper = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)",
    ]
    result = child_seconds(wrapper + argv, env, first_step)
    peak = [line for line in result["output"].splitlines() if line.startswith("PEAK_RSS_KB")]
    result["peak_rss_mib"] = int(peak[-1].split()[1]) / 1024
    return result


def train(file: pathlib.Path, work: pathlib.Path, name: str, env: dict, steps: int) -> dict:
    out = work / f"run-{name}"
    argv = [sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "--tasks", f"big={file}"]
    argv += ["--steps", str(steps), "--out", str(out), "--cache-dir", str(work / "cache")]
    argv += ["--set", "train.log_every=1", "--set", "train.eval_examples=8", "--set", "train.eval_every=0"]
    result = run_measured(argv, env, first_step=out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    lines = [line for line in result["output"].splitlines() if line.startswith("task big")]
    sizes = [line for line in lines if line.startswith("task big (")]
    load = float(sizes[-1].rsplit(";", 1)[1].strip().rstrip("s")) if sizes else None  # prepare's time for the task
    return {k: v for k, v in result.items() if k != "output"} | {"data_load_s": load, "lines": lines}


TOKENIZE = r"""
import json, sys, time, resource
sys.path.insert(0, {root!r})
from tasks import cache, ByteTokenizer
from tasks.data import encode_prompts, token_dtype
from tasks.user_files import TaskFile
from tasks.hf_tokenizer import HFTokenizer
file, work, which = {file!r}, {work!r}, {which!r}
tok = ByteTokenizer() if which == "bytes" else HFTokenizer.from_folder(work + "/bpe")
t0 = time.perf_counter()
entry, built = cache.cached_file(TaskFile.open(file), tok, work + "/cache-" + which)
build = time.perf_counter() - t0
rows = entry.meta["rows"]
# The limit: the tokenizer's own batch encoding of the same texts, held in memory, on the same cores.
import pyarrow.json as pj
texts = pj.read_json(file).column("input").to_pylist()
t0 = time.perf_counter()
for start in range(0, len(texts), 65536):
    encode_prompts(tok, texts[start:start + 65536], token_dtype(tok.vocab_size))
limit = time.perf_counter() - t0
print(json.dumps({{"rows": rows, "build_s": build, "rows_per_s": rows / build, "limit_rows_per_s": len(texts) / limit,
                  "cache_mib": entry.size / 2**20,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

DATASETS_MAP = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import datasets
from tasks import ByteTokenizer
from tasks.hf_tokenizer import HFTokenizer
from tasks.data import encode_prompts
file, work, which = {file!r}, {work!r}, {which!r}
tok = ByteTokenizer() if which == "bytes" else HFTokenizer.from_folder(work + "/bpe")
def tokenize(batch):
    flat, lens = encode_prompts(tok, batch["input"])
    ends = lens.cumsum()
    return {{"input_ids": [flat[e - n:e] for e, n in zip(ends.tolist(), lens.tolist())]}}
t0 = time.perf_counter()
ds = datasets.load_dataset("json", data_files=file, split="train", cache_dir=work + "/hf-" + which)
loaded = time.perf_counter() - t0
ds = ds.map(tokenize, batched=True, num_proc=os.cpu_count(), remove_columns=["input"])
total = time.perf_counter() - t0
print(json.dumps({{"rows": len(ds), "load_s": loaded, "map_s": total - loaded, "rows_per_s": len(ds) / total}}))
"""


def python_child(script: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def train_bpe(file: pathlib.Path, folder: pathlib.Path, vocab: int = 8192) -> None:
    """A byte-level BPE (GPT-2's kind) trained on the file's first 100k inputs, saved as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    with open(file, encoding="utf-8") as f:
        for line, _ in zip(f, range(100_000)):
            texts.append(json.loads(line)["input"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=alphabet)
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the big file")
    p.add_argument("--small", type=int, default=100_000, help="rows of the small file")
    p.add_argument("--steps", type=int, default=20, help="training steps of each run")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train, tokenize, datasets")
    p.add_argument("--workdir", help="where the files go (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="mtl-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    need = args.rows * 100 * 6  # the file, two caches (2 bytes a token), datasets' Arrow copies
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(
            f"{work} has {free / 2**30:.1f} GiB free; {args.rows:,} rows need about {need / 2**30:.1f} GiB"
        )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    report = {"rows": args.rows, "small": args.small, "cpus": os.cpu_count(), "load": os.getloadavg()}
    try:
        big, small = work / f"big-{args.rows}.jsonl", work / f"small-{args.small}.jsonl"
        t0 = time.perf_counter()
        generate(big, args.rows)
        generate(small, args.small, seed=1)
        report["file_mib"] = big.stat().st_size / 2**20
        report["generate_s"] = time.perf_counter() - t0
        print(json.dumps({"generated": report}), flush=True)
        if "train" not in skip:
            for name, file in (("small", small), ("big", big)):
                report[f"train_{name}_cold"] = train(file, work, f"{name}-cold", env, args.steps)
                report[f"train_{name}_warm"] = train(file, work, f"{name}-warm", env, args.steps)
                print(json.dumps({name: [report[f"train_{name}_cold"], report[f"train_{name}_warm"]]}), flush=True)
        if "tokenize" not in skip or "datasets" not in skip:
            train_bpe(big, work / "bpe")
        for which in ("bytes", "bpe"):
            values = {"root": str(ROOT), "file": str(big), "work": str(work), "which": which}
            if "tokenize" not in skip:
                report[f"tokenize_{which}"] = python_child(TOKENIZE.format(**values), env)
                print(json.dumps({which: report[f"tokenize_{which}"]}), flush=True)
            if "datasets" not in skip:
                report[f"datasets_map_{which}"] = python_child(DATASETS_MAP.format(**values), env)
                print(json.dumps({f"datasets {which}": report[f"datasets_map_{which}"]}), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
