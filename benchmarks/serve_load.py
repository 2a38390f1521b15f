"""Load over HTTP: many concurrent clients against ``serve.py --http`` in its own process.

    python benchmarks/serve_load.py                          # random small-preset weights, a few minutes
    python benchmarks/serve_load.py --rates 8,32 --duration 10 --no-fairness
    python benchmarks/serve_load.py --ckpt runs/demo         # a trained run (its own tasks)

The server is started as users start it (``serve.py --ckpt RUN --http``), on
a checkpoint of random small-preset weights written to a temporary folder
(tasks ``g2p`` and ``spell`` generate, ``langid`` classifies), or on
``--ckpt``. Clients (aiohttp, one connection a request, no limit on how many
are open) send serve_bench.py's heavy-tailed mixed-task workload (80%
generation with Pareto prompt and output lengths, half greedy and half
sampled; 20% classification) at Poisson arrivals of each ``--rates`` for
``--duration`` seconds, with ``--malformed`` of the requests malformed (bad
JSON, an unknown task, a missing field, a value out of range, an input too
long), which must be answered 400 (404 for the unknown task). Generation requests stream
(``"stream": true`` on ``/v1/infer``), so time to first token is measured
by the client, at the first event (sent at the first token).

Reported per rate: throughput (answered requests/s, generated tokens/s), TTFT
/ TPOT / end-to-end latency p50 and p99, goodput (requests/s that met the
latency objective: TTFT <= ``--slo-ttft-ms`` and TPOT <= ``--slo-tpot-ms``
for generation, end to end <= ``--slo-ttft-ms`` for classification), 429s,
and requests lost (no complete answer, or a wrong status: must be 0); the
server's resident memory at start and after each rate.

The fairness run (on by default) starts the server once with
``serve.scheduler=fifo`` and once with ``fair``, with ``--flood-slots`` decode
slots (4, so that the flood is past what the server can serve on 2 cores):
task ``spell`` floods with long generations at ``--flood-factor`` times the
rate of task ``g2p``'s short ones, and the small task's p50 / p99 latency is
reported under each scheduler. Figures and commands: docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
MALFORMED = ("bad json", "unknown task", "no input", "top_p 0", "too long")


def write_checkpoint(folder: pathlib.Path, max_batch: int) -> None:
    """A run folder with one checkpoint of random small-preset weights and three tasks."""
    import dataclasses

    from flax import nnx

    from mtl import config as C
    from mtl.checkpoint import Checkpoints
    from mtl.config import HeadConfig
    from mtl.model import MultiTaskModel

    heads = (HeadConfig("g2p", "generate"), HeadConfig("spell", "generate"), HeadConfig("langid", "classify", 10))
    small = C.PRESETS["small"]()
    cfg = C.Config(
        model=dataclasses.replace(small.model, heads=heads), serve=dataclasses.replace(small.serve, max_batch=max_batch)
    )
    langs = ["de", "en", "es", "fr", "it", "nl", "pl", "pt", "sv", "tr"]
    task_meta = [
        {"name": "g2p", "kind": "generate", "description": "", "labels": [], "max_new_tokens": 32},
        {"name": "spell", "kind": "generate", "description": "", "labels": [], "max_new_tokens": 32},
        {"name": "langid", "kind": "classify", "description": "", "labels": langs, "max_new_tokens": 0},
    ]
    model = MultiTaskModel(cfg.model, rngs=nnx.Rngs(0))
    checkpoints = Checkpoints(folder / "checkpoints")
    state = nnx.state(model)
    checkpoints.save(0, state, state, {"config": C.to_dict(cfg), "tasks": task_meta, "step": 0})
    checkpoints.wait()
    checkpoints.close()


def text(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(LETTERS, n)).strip() or "a"


def workload(n: int, seed: int, malformed: float, max_len: int = 96, alpha: float = 1.3) -> list[dict]:
    """serve_bench.py's mix as request objects: 80% generation (Pareto prompt and output lengths, half
    greedy, half sampled), 20% classification, and ``malformed`` of them malformed (expected: 400)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        prompt_len = int(min(max_len // 2, 4 + rng.pareto(alpha) * 6))
        body: dict = {"id": i, "input": text(rng, prompt_len - 2)}
        if rng.random() < malformed:
            kind = MALFORMED[i % len(MALFORMED)]
            body.update(task="g2p")
            if kind == "unknown task":
                body["task"] = "nope"
            elif kind == "no input":
                del body["input"]
            elif kind == "top_p 0":
                body["top_p"] = 0
            elif kind == "too long":
                body["input"] = "x" * (2 * max_len)
            raw = b'{"id": 1, "task": ' if kind == "bad json" else json.dumps(body).encode()
            items.append({"body": raw, "expect": 400, "task": None})
            continue
        if rng.random() < 0.2:
            body["task"] = "langid"
            items.append({"body": json.dumps(body).encode(), "expect": 200, "task": "langid"})
            continue
        body["task"] = "g2p" if rng.random() < 0.5 else "spell"
        body["max_new_tokens"] = int(min(max_len - prompt_len, 1 + rng.pareto(alpha) * 8))
        if rng.random() < 0.5:
            body.update(temperature=0.8, top_k=40, seed=i)
        body["stream"] = True
        items.append({"body": json.dumps(body).encode(), "expect": 200, "task": body["task"]})
    return items


async def send(session, url: str, item: dict, t_send: float) -> dict:
    """One request; its outcome and client-side timings (seconds from ``t_send``)."""
    out = {"task": item["task"], "expect": item["expect"], "lost": None}
    try:
        async with session.post(url, data=item["body"], headers={"Content-Type": "application/json"}) as response:
            out["status"] = response.status
            if response.content_type == "text/event-stream":
                final, first = None, None
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    first = first or time.perf_counter()
                    event = json.loads(line[6:])
                    if "delta" not in event:
                        final = event
                end = time.perf_counter()
                if final is None or "error" in final:
                    out["lost"] = f"stream ended without an answer: {final}"
                else:
                    out.update(ttft=first - t_send, e2e=end - t_send, tokens=final["tokens"])
            else:
                answer = await response.json()
                out["e2e"] = time.perf_counter() - t_send
                if response.status == 200 and "tokens" in answer:
                    out.update(ttft=out["e2e"], tokens=answer["tokens"])
                if not isinstance(answer, dict) or ("error" in answer) != (response.status != 200):
                    out["lost"] = f"not an answer object: {answer}"
    except Exception as e:  # a connection reset, a timeout: lost
        out["lost"] = f"{type(e).__name__}: {e}"
    status = out.get("status")
    # An unknown task is 404 since the serving wing (400 before it): either is its answer.
    expected = (400, 404) if item["expect"] == 400 else (item["expect"],)
    if out["lost"] is None and status not in expected and status != 429:
        out["lost"] = f"status {status}, expected {item['expect']}"
    return out


async def drive(port: int, items: list[dict], arrivals: np.ndarray) -> tuple[list[dict], float]:
    """Sends ``items`` at ``arrivals`` (seconds), each on its own connection; returns outcomes and wall time."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/infer"
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        tasks = []
        for item, at in zip(items, arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(session, url, item, time.perf_counter())))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def summary(results: list[dict], wall: float, slo_ttft: float, slo_tpot: float) -> dict:
    good = [r for r in results if r["lost"] is None and r.get("status") == 200]
    gens = [r for r in good if "tokens" in r]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in gens if r["tokens"] > 1]

    def pct(values, q):
        return float(np.percentile(values, q)) * 1e3 if values else float("nan")

    def met(r):
        if "tokens" not in r:
            return r["e2e"] <= slo_ttft
        per_token = (r["e2e"] - r["ttft"]) / (r["tokens"] - 1) if r["tokens"] > 1 else 0.0
        return r["ttft"] <= slo_ttft and per_token <= slo_tpot

    e2e = [r["e2e"] for r in good]
    return {
        "sent": len(results),
        "req/s": len(good) / wall,
        "tok/s": sum(r["tokens"] for r in gens) / wall,
        "ttft p50": pct([r["ttft"] for r in gens], 50),
        "ttft p99": pct([r["ttft"] for r in gens], 99),
        "tpot p50": pct(tpot, 50),
        "tpot p99": pct(tpot, 99),
        "e2e p50": pct(e2e, 50),
        "e2e p99": pct(e2e, 99),
        "goodput": sum(map(met, good)) / wall,
        "400": sum(r.get("status") in (400, 404) and r["lost"] is None for r in results),
        "429": sum(r.get("status") == 429 for r in results),
        "lost": sum(r["lost"] is not None for r in results),
    }


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class ServerProcess:
    """``serve.py --ckpt RUN --http 127.0.0.1:PORT [--set ...]`` in its own process, until closed."""

    def __init__(self, ckpt: str, overrides: list[str], log: pathlib.Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [sys.executable, str(ROOT / "serve.py"), "--ckpt", ckpt, "--http", f"127.0.0.1:{self.port}"]
        for assignment in overrides:
            args += ["--set", assignment]
        self.log = log
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=ROOT)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 300) -> None:
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"serve.py did not answer /health in {timeout:.0f}s")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


COLUMNS = ("sent", "req/s", "tok/s", "ttft p50", "ttft p99", "tpot p50", "tpot p99", "e2e p50", "e2e p99")
COLUMNS += ("goodput", "400", "429", "lost")


def print_row(name: str, f: dict, rss: float) -> None:
    cells = "".join(f"{f[k]:>9.0f}" if k in ("sent", "400", "429", "lost") else f"{f[k]:>9.1f}" for k in COLUMNS)
    print(f"{name:<14}{cells}{rss:>9.0f}", flush=True)


def load_run(args, ckpt: str, log_dir: pathlib.Path) -> int:
    server = ServerProcess(ckpt, [f"serve.scheduler={args.scheduler}", *args.set], log_dir / "serve_load.log")
    lost = 0
    try:
        start = rss_mb(server.process.pid)
        print(f"server pid {server.process.pid} on port {server.port}, RSS after warm-up {start:.0f} MB")
        print(f"{'rate':<14}" + "".join(f"{k:>9}" for k in COLUMNS) + f"{'RSS MB':>9}   (times in ms)")
        rng = np.random.default_rng(args.seed)
        for i, rate in enumerate(map(float, args.rates.split(","))):
            n = max(1, int(rate * args.duration))
            items = workload(n, args.seed + i, args.malformed)
            arrivals = np.cumsum(rng.exponential(1 / rate, n))
            results, wall = asyncio.run(drive(server.port, items, arrivals))
            f = summary(results, wall, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
            lost += f["lost"]
            print_row(f"{rate:g} req/s", f, rss_mb(server.process.pid))
            for r in results:
                if r["lost"]:
                    print(f"  lost: {r['lost']}")
        end = rss_mb(server.process.pid)
        print(f"server RSS: {start:.0f} MB after warm-up, {end:.0f} MB at the end ({end - start:+.0f} MB)")
    finally:
        server.close()
    return lost


def fairness_run(args, ckpt: str, log_dir: pathlib.Path) -> None:
    """One task floods at ``flood_factor`` times the small task's rate; the small task's latency by scheduler."""
    n_small = max(1, int(args.small_rate * args.flood_duration))
    n_flood = int(args.small_rate * args.flood_factor * args.flood_duration)
    rng = np.random.default_rng(args.seed + 100)
    items, times = [], []
    for i in range(n_flood):
        body = {"id": f"f{i}", "task": "spell", "input": text(rng, 12), "max_new_tokens": args.flood_tokens}
        items.append({"body": json.dumps(body).encode(), "expect": 200, "task": "spell"})
    for i in range(n_small):
        body = {"id": f"s{i}", "task": "g2p", "input": text(rng, 8), "max_new_tokens": 8}
        items.append({"body": json.dumps(body).encode(), "expect": 200, "task": "g2p"})
    times = np.concatenate(
        [
            np.cumsum(rng.exponential(1 / (args.small_rate * args.flood_factor), n_flood)),
            np.cumsum(rng.exponential(1 / args.small_rate, n_small)),
        ]
    )
    order = np.argsort(times, kind="stable")
    items, times = [items[i] for i in order], times[order]
    print(
        f"\nfairness: spell floods at {args.small_rate * args.flood_factor:g} req/s ({args.flood_tokens} new tokens "
        f"each), g2p at {args.small_rate:g} req/s (8 new tokens), for {args.flood_duration:g} s"
    )
    print(
        f"{'scheduler':<10}{'task':<8}{'sent':>6}{'answered':>10}{'429':>6}{'lost':>6}{'tokens':>8}"
        f"{'e2e p50':>10}{'e2e p99':>10}"
    )
    for scheduler in ("fifo", "fair"):
        overrides = [f"serve.scheduler={scheduler}", f"serve.max_batch={args.flood_slots}", *args.set]
        server = ServerProcess(ckpt, overrides, log_dir / f"fair_{scheduler}.log")
        try:
            results, _ = asyncio.run(drive(server.port, items, times))
        finally:
            server.close()
        for task in ("g2p", "spell"):
            mine = [r for r in results if r["task"] == task]
            done = [r for r in mine if r["lost"] is None and r.get("status") == 200]
            ok = [r["e2e"] * 1e3 for r in done]
            p50, p99 = (np.percentile(ok, 50), np.percentile(ok, 99)) if ok else (float("nan"),) * 2
            lost = sum(r["lost"] is not None for r in mine)
            refused = sum(r.get("status") == 429 for r in mine)
            tokens = np.mean([r["tokens"] for r in done]) if done else float("nan")
            print(
                f"{scheduler:<10}{task:<8}{len(mine):>6}{len(ok):>10}{refused:>6}{lost:>6}{tokens:>8.1f}"
                f"{p50:>10.0f}{p99:>10.0f}"
            )


async def openai_burst(port: int, clients: int, seed: int) -> dict:
    """``clients`` concurrent ``/v1/completions`` calls through the ``openai`` client (AsyncOpenAI), all at once."""
    import openai

    rng = np.random.default_rng(seed)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key=os.environ.get("MTL_API_KEY", "none"),
        max_retries=0,
        timeout=600,
    )
    prompts = [text(rng, int(rng.integers(6, 24))) for _ in range(clients)]

    async def one(prompt: str):
        t = time.perf_counter()
        try:
            r = await client.completions.create(model="g2p", prompt=prompt, max_tokens=16, temperature=0)
        except Exception as e:  # a refusal or a failure: counted, not raised
            return {"error": f"{type(e).__name__}: {e}"}
        return {"e2e": time.perf_counter() - t, "tokens": r.usage.completion_tokens}

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if "error" not in r]
    e2e = [r["e2e"] * 1e3 for r in ok]
    return {
        "clients": clients,
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "wall s": wall,
        "req/s": len(ok) / wall,
        "tok/s": sum(r["tokens"] for r in ok) / wall,
        "e2e p50": float(np.percentile(e2e, 50)) if e2e else float("nan"),
        "e2e p99": float(np.percentile(e2e, 99)) if e2e else float("nan"),
        "first error": next((r["error"] for r in results if "error" in r), None),
    }


def openai_run(args, ckpt: str, log_dir: pathlib.Path) -> int:
    """The ``openai`` client at ``--openai-clients`` concurrent completions, twice (the first warms connections)."""
    server = ServerProcess(ckpt, [f"serve.scheduler={args.scheduler}", *args.set], log_dir / "openai.log")
    try:
        print(f"\nopenai client: {args.openai_clients} concurrent /v1/completions (16 new tokens, greedy)")
        for attempt in range(2):
            f = asyncio.run(openai_burst(server.port, args.openai_clients, args.seed + attempt))
            print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()))
    finally:
        server.close()
    return f["errors"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a run folder to serve (default: random small-preset weights in a temp folder)")
    p.add_argument("--max-batch", type=int, default=16, help="decode slots of the written checkpoint")
    p.add_argument("--rates", default="8,32,96", help="Poisson request rates (requests/s), comma-separated")
    p.add_argument("--duration", type=float, default=15, help="seconds of arrivals at each rate")
    p.add_argument("--malformed", type=float, default=0.05, help="the share of requests that are malformed")
    p.add_argument("--slo-ttft-ms", type=float, default=500, help="latency objective: time to first token")
    p.add_argument("--slo-tpot-ms", type=float, default=50, help="latency objective: time per output token")
    p.add_argument("--scheduler", default="fair", help="serve.scheduler of the load runs")
    p.add_argument("--set", action="append", default=[], help="more serve.KEY=VALUE overrides for serve.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fairness", dest="fairness", action="store_false", help="skip the fairness run")
    p.add_argument("--small-rate", type=float, default=4, help="fairness: the small task's rate (requests/s)")
    p.add_argument("--flood-factor", type=float, default=30, help="fairness: the flooding task's rate / the small's")
    p.add_argument("--flood-tokens", type=int, default=64, help="fairness: new tokens of each flooding request")
    p.add_argument("--flood-duration", type=float, default=15, help="fairness: seconds of arrivals")
    p.add_argument("--flood-slots", type=int, default=4, help="fairness: the server's decode slots (serve.max_batch)")
    p.add_argument("--no-load", dest="load", action="store_false", help="skip the load runs (fairness only)")
    p.add_argument("--openai-clients", type=int, default=300, help="concurrent openai-client requests (0: skip)")
    args = p.parse_args(argv)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print('serve_load.py needs aiohttp: pip install -e ".[serve]"', file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mtl-serve-load-") as tmp:
        tmp = pathlib.Path(tmp)
        ckpt = args.ckpt
        if ckpt is None:
            ckpt = str(tmp / "run")
            t = time.perf_counter()
            write_checkpoint(pathlib.Path(ckpt), args.max_batch)
            print(f"wrote a random small-preset checkpoint to {ckpt} in {time.perf_counter() - t:.1f}s")
        print(
            f"{os.cpu_count()} CPU cores (client and server share them); latency objective: TTFT <= "
            f"{args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms (classification: end to end <= "
            f"{args.slo_ttft_ms:g} ms)"
        )
        lost = load_run(args, ckpt, tmp) if args.load else 0
        if args.fairness:
            fairness_run(args, ckpt, tmp)
        if args.openai_clients:
            lost += openai_run(args, ckpt, tmp)
    print(f"\nrequests lost: {lost}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
