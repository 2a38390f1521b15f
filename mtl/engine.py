"""The serving engine: batched prefill and decoding of mixed-task requests.

Requests arrive as token ids with a task name and sampling settings. Requests
whose task has a non-generation head (classify) are answered from one prefill; generation requests of
any generation task share decode batches. Shapes are fixed by
``max_batch``, a few prompt-length buckets and the model's ``max_len``, so
after warm-up nothing recompiles. This is static batching: a batch decodes
until its last row is done.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl import decode
from mtl.model import MultiTaskModel
from sharding import named_sharding


@dataclasses.dataclass(frozen=True)
class Request:
    """One validated request in token ids."""

    task: str
    prompt: Sequence[int]
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    arrival: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: list[int]  # without the EOS
    finish_reason: str  # "stop" (EOS) or "length"
    ttft_ms: float
    latency_ms: float


@dataclasses.dataclass(frozen=True)
class HeadOutput:
    """A non-generation head's answer for one request (see ``MultiTaskModel.head_outputs``)."""

    values: np.ndarray  # classify: [C] label probabilities
    latency_ms: float


def length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Prompt lengths to pad to: powers of two from ``smallest``, then ``max_len``."""
    buckets, size = [], smallest
    while size < max_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_len)


class Engine:
    """Serves requests of every task kind from one sharded model."""

    def __init__(
        self,
        model: MultiTaskModel,
        mesh: jax.sharding.Mesh,
        *,
        max_batch: int,
        allowed_tokens: np.ndarray,
        eos_id: int,
        pad_id: int,
    ):
        self.cfg = model.cfg
        self.mesh = mesh
        self.max_batch = max_batch
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.buckets = length_buckets(self.cfg.max_len)
        self.graphdef, self.params = nnx.split(model)
        self.allowed = jnp.asarray(allowed_tokens, bool)
        self.kinds = {h.task: h.kind for h in self.cfg.heads}
        self.task_ids = {h.task: i for i, h in enumerate(self.cfg.heads)}
        self.traces = collections.Counter()  # compilations by function, counted as they trace
        self._heads = jax.jit(self._heads_fn)
        self._start = jax.jit(self._start_fn)
        self._step = jax.jit(self._step_fn, donate_argnums=1)

    # Pure functions of (params, arrays); jitted once per shape.

    def _heads_fn(self, params, tokens, lengths, task_ids):
        self.traces["heads"] += 1
        model = nnx.merge(self.graphdef, params)
        hidden, _ = model(tokens, task_ids)
        return model.head_outputs(hidden, lengths)

    def _start_fn(self, params, tokens, lengths, task_ids, sampling, max_new):
        self.traces["start"] += 1
        model = nnx.merge(self.graphdef, params)
        s = self.cfg.max_len
        return decode.start(model, tokens, lengths, task_ids, sampling, max_new, self.allowed, self.eos_id, s, s)

    def _step_fn(self, params, state):
        self.traces["step"] += 1
        model = nnx.merge(self.graphdef, params)
        return decode.decode_step(model, state, self.allowed, self.eos_id)

    # Host side.

    def max_prompt_len(self) -> int:
        return self.cfg.max_len - 1  # room for at least one new token

    def _put(self, array: np.ndarray) -> jax.Array:
        axes = ("batch",) + (None,) * (array.ndim - 1)
        return jax.device_put(array, named_sharding(axes, array.shape, self.mesh))

    def _pack(self, requests: Sequence[Request]):
        """Right-pads prompts to a shared bucket and the batch to ``max_batch`` rows."""
        width = max(self.bucket(r) for r in requests)
        tokens = np.full((self.max_batch, width), self.pad_id, np.int32)
        lengths = np.ones(self.max_batch, np.int32)
        task_ids = np.zeros(self.max_batch, np.int32)
        for row, r in enumerate(requests):
            tokens[row, : len(r.prompt)] = r.prompt
            lengths[row] = len(r.prompt)
            task_ids[row] = self.task_ids[r.task]
        return self._put(tokens), self._put(lengths), self._put(task_ids)

    def bucket(self, request: Request) -> int:
        return next(b for b in self.buckets if b >= len(request.prompt))

    def warmup(self, scored: Sequence[Request], generate: Sequence[Request]) -> None:
        """Compiles what these requests will need, one small call per prompt bucket,
        so that compilation is not counted in their latency."""
        for bucket in sorted({self.bucket(r) for r in scored}):
            self.score([next(r for r in scored if self.bucket(r) == bucket)])
        for bucket in sorted({self.bucket(r) for r in generate}):
            request = next(r for r in generate if self.bucket(r) == bucket)
            self.generate([dataclasses.replace(request, max_new_tokens=2)])

    def score(self, requests: Sequence[Request]) -> list[HeadOutput]:
        """Answers requests of non-generation tasks (any mix of them) from their prefill."""
        results: list[HeadOutput] = []
        for chunk in _chunks(requests, self.max_batch):
            with jax.set_mesh(self.mesh):
                outputs = self._heads(self.params, *self._pack(chunk))
            outputs = jax.device_get(outputs)
            now = time.perf_counter()
            for row, r in enumerate(chunk):
                results.append(HeadOutput(outputs[r.task][row], (now - r.arrival) * 1e3))
        return results

    def generate(self, requests: Sequence[Request], check_every: int = 8) -> list[Generation]:
        """Generates for requests of any generation tasks, ``max_batch`` at a time."""
        results: list[Generation] = []
        for chunk in _chunks(requests, self.max_batch):
            results.extend(self._generate_batch(chunk, check_every))
        return results

    def _generate_batch(self, chunk: Sequence[Request], check_every: int) -> list[Generation]:
        n = self.max_batch
        budget = np.ones(n, np.int32)  # padding rows: one token, then done
        sampling = np.zeros((4, n), np.float32)
        sampling[2] = 1.0
        seeds = np.zeros(n, np.uint32)
        for row, r in enumerate(chunk):
            budget[row] = max(1, min(r.max_new_tokens, self.cfg.max_len - len(r.prompt)))
            sampling[:3, row] = (r.temperature, r.top_k, r.top_p)
            seeds[row] = r.seed
        params = decode.Sampling(
            temperature=self._put(sampling[0]),
            top_k=self._put(sampling[1].astype(np.int32)),
            top_p=self._put(sampling[2]),
            seed=self._put(seeds),
        )
        with jax.set_mesh(self.mesh):
            state = self._start(self.params, *self._pack(chunk), params, self._put(budget))
            jax.block_until_ready(state.tokens)
            first_token_at = time.perf_counter()
            for _ in range(int(budget.max()) - 1):
                state = self._step(self.params, state)
                if (_ + 1) % check_every == 0 and bool(np.asarray(state.done).all()):
                    break
        output, count, done = jax.device_get((state.output, state.count, state.done))
        finished = time.perf_counter()
        results = []
        for row, r in enumerate(chunk):
            tokens = output[row, : count[row]].tolist()
            stopped = bool(tokens) and tokens[-1] == self.eos_id
            results.append(
                Generation(
                    tokens=tokens[:-1] if stopped else tokens,
                    finish_reason="stop" if stopped else "length",
                    ttft_ms=(first_token_at - r.arrival) * 1e3,
                    latency_ms=(finished - r.arrival) * 1e3,
                )
            )
        assert done[: len(chunk)].all()
        return results


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
