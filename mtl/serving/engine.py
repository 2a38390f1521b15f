"""The serving engine's device work: jitted prefill, insert and decode steps over a slotted KV cache.

The engine holds what lives on the mesh: the model's weights (and a second
copy laid out for decoding, ``decode.DecodeWeights``, made again whenever
``params`` is assigned), the decode state of ``max_batch`` slots, and the
three compiled programs. It makes no decision: the scheduler
(:mod:`mtl.serving.scheduler`, host only) chooses which requests to prefill,
into which slots, and how many steps to run, and calls

- :meth:`Engine.prefill`: a batch of ``prefill_batch`` prompts padded to one
  of a few length buckets; its generation rows inserted into free slots;
- :meth:`Engine.decode`: one chunk of up to ``steps_per_call`` decode steps for
  every slot (decode state donated), ending early once ``stop_after`` slots are
  done on device, reading only the cache's first ``span`` positions, the
  smallest of :attr:`Engine.spans` that holds every position the chunk writes;
- :meth:`Engine.fetch`: the host's copy of what a dispatched call returned.

Dispatch is asynchronous: each call returns at once with its outputs already
copying to the host, so the scheduler reads one chunk while the next runs.

Shapes are fixed by ``max_batch``, ``prefill_batch``, the buckets, the spans
and the model's ``max_len``; :meth:`Engine.warmup` compiles every one of them,
and nothing compiles afterwards. Spans (length buckets of the decode step,
powers of two from 128, compiled at warm-up) rather than a paged or ragged
layout: on XLA:CPU a step is a few fused loops over the cache, so what it costs
is what it reads, and a contiguous prefix is read by the same program as the
whole cache; pages would need a gather (or a Pallas kernel, which XLA:CPU
lacks) to read the same bytes. The KV cache is stored as ``kv_dtype``
(``serve.kv_dtype``: the compute dtype, or int8 with per-head scales). The decode state is partitioned over the serving
mesh like the model: slots over ``data`` (and ``fsdp``), kv heads over
``tensor``.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl import decode
from mtl.model import MultiTaskModel
from mtl.serving.requests import Request
from sharding import named_sharding


def length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Prompt lengths to pad to: powers of two from ``smallest``, then ``max_len``."""
    buckets, size = [], smallest
    while size < max_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_len)


def slots_that_fit(cfg, max_batch: int, kv_dtype: str, kv_memory: int) -> int:
    """Decode slots of ``cfg.max_len`` positions whose KV cache fits ``kv_memory`` bytes, at most ``max_batch``
    (``kv_memory`` 0: ``max_batch``).

    Raises:
      ValueError: not one slot fits, naming what one takes.
    """
    if not kv_memory:
        return max_batch
    slot = cfg.max_len * decode.cache_bytes_per_position(cfg, decode.kv_dtype(cfg, kv_dtype))
    if kv_memory < slot:
        raise ValueError(
            f"serve.kv_memory={kv_memory / 2**20:.1f}MiB holds no decode slot: one of {cfg.max_len} positions takes "
            f"{slot / 2**20:.1f}MiB as {decode.kv_dtype(cfg, kv_dtype).name}; give at least that, "
            "a smaller serve.kv_dtype (bfloat16, int8) or a shorter model.max_len"
        )
    return min(max_batch, kv_memory // slot)


SMALLEST_SPAN = 128  # the shortest cache prefix a decode step reads; shorter ones save little on CPU


class Engine:
    """The compiled programs and device state that serve one sharded model.

    Args:
      model: the model; its parameters keep the shardings they have.
      mesh: the serving mesh.
      max_batch: decode slots (generation requests decoded together).
      allowed_tokens: [V] bool, the tokens generation may produce.
      eos_id: the tokenizer's end id, or every id that ends a generation
        (a model's generation config may list several); any of them stops a slot.
      pad_id: the tokenizer's padding id.
      prefill_batch: prompts prefilled together (default ``min(max_batch, 8)``).
      steps_per_call: the most decode steps one jitted call runs; more
        amortises dispatch and read-back, fewer lets arrivals in sooner.
      kv_dtype: how the KV cache is stored (``config.KV_DTYPES``); empty: the model's compute dtype.
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
        steps_per_call: int = 8,
        kv_dtype: str = "",
    ):
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call {steps_per_call} must be at least 1")
        self.cfg = model.cfg
        self.mesh = mesh
        self.max_batch = max_batch
        self.prefill_batch = prefill_batch or min(max_batch, 8)
        self.steps_per_call = steps_per_call
        self.eos_ids = tuple(int(i) for i in np.atleast_1d(eos_id))
        self.pad_id = pad_id
        self.buckets = length_buckets(self.cfg.max_len)
        self.spans = length_buckets(self.cfg.max_len, smallest=SMALLEST_SPAN)
        self.kv_dtype = decode.kv_dtype(self.cfg, kv_dtype)
        self.graphdef, params = nnx.split(model)
        self._weights = jax.jit(lambda p: decode.decode_weights(nnx.merge(self.graphdef, p)))
        self.params = params  # lays out the decode weights too
        self.allowed = jnp.asarray(allowed_tokens, bool)
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
            self._step_fn,
            donate_argnums=2,
            static_argnums=5,
            out_shardings=(state_shardings, host, host),
            compiler_options=options,
        )
        # Whether a slot can end before its budget on device: then a chunk may end early for waiting requests.
        self.eos_allowed = bool(np.asarray(allowed_tokens)[list(self.eos_ids)].any())

    # Pure functions of (params, arrays); jitted once per shape.

    def _prefill_fn(self, params, weights, tokens, lengths, task_ids, sampling, max_new, stops):
        self.traces["prefill"] += 1
        model = nnx.merge(self.graphdef, params)
        s = self.cfg.max_len
        return decode.prefill_rows(
            model, weights, tokens, lengths, task_ids, sampling, max_new, self.allowed, self.eos_ids, s, stops,
            self.kv_dtype,
        )

    def _insert_fn(self, state, rows, slots):
        self.traces["insert"] += 1
        return decode.insert(state, rows, slots)

    def _step_fn(self, params, weights, state, steps, stop_after, span):
        self.traces["step"] += 1
        model = nnx.merge(self.graphdef, params)
        return decode.decode_steps(
            model, weights, state, steps, stop_after, self.steps_per_call, self.allowed, self.eos_ids, span
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
            cache=decode.empty_cache(cfg, n, zeros=np.zeros, dtype=self.kv_dtype),
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

    # What the scheduler calls.

    def max_prompt_len(self) -> int:
        return self.cfg.max_len - 1  # room for at least one new token

    def bucket(self, length: int) -> int:
        """The padded width a prompt of ``length`` tokens is prefilled at."""
        return next(b for b in self.buckets if b >= length)

    def prefill(
        self, requests: Sequence[Request], rows: Sequence[int], budgets: Sequence[int], slots: Sequence[int | None]
    ) -> Any:
        """Dispatches a prefill of ``requests`` (at most ``prefill_batch``) and inserts rows into decode slots.

        Args:
          requests: the prompts and their sampling settings.
          rows: each request's task row.
          budgets: each request's most new tokens (its first comes from this prefill).
          slots: the decode slot each generation request goes to; None: not inserted
            (a non-generation request, or one whose budget this prefill spends).

        Returns:
          What :meth:`fetch` reads: ``(first, heads)``, each row's first token [P] and every head's rows.
        """
        p = self.prefill_batch
        width = max(self.bucket(len(r.prompt)) for r in requests)
        tokens = np.full((p, width), self.pad_id, np.int32)
        lengths = np.ones(p, np.int32)
        task_ids = np.zeros(p, np.int32)
        max_new = np.ones(p, np.int32)
        sampling = _sampling_arrays(p)
        into = np.full(p, self.max_batch, np.int32)  # out of range: not inserted
        for i, (r, row, budget, slot) in enumerate(zip(requests, rows, budgets, slots)):
            tokens[i, : len(r.prompt)] = r.prompt
            lengths[i] = len(r.prompt)
            task_ids[i] = row
            max_new[i] = budget
            sampling.temperature[i], sampling.top_k[i], sampling.top_p[i] = r.temperature, r.top_k, r.top_p
            sampling.seed[i] = r.seed
            if slot is not None:
                into[i] = slot
        stops = decode.stop_array([r.stop for r in requests], p)
        with jax.set_mesh(self.mesh):
            # Host arrays go straight into the call: a device_put costs more.
            new_rows, first, heads = self._prefill(
                self._arrays, self.weights, tokens, lengths, task_ids, sampling, max_new, stops
            )
            if (into < self.max_batch).any():
                self.state = self._insert(self.state, new_rows, into)
        for a in (first, *jax.tree.leaves(heads)):
            a.copy_to_host_async()
        return first, heads

    def cache_bytes(self) -> int:
        """Bytes of the decode slots' KV cache."""
        return self.max_batch * self.cfg.max_len * decode.cache_bytes_per_position(self.cfg, self.kv_dtype)

    def span(self, reach: int) -> int:
        """The smallest span that holds positions 0 to ``reach`` - 1."""
        return next((s for s in self.spans if s >= reach), self.spans[-1])

    def decode(self, steps: int, stop_after: int, reach: int | None = None) -> Any:
        """Dispatches ``steps`` decode steps for every slot, ending early once ``stop_after`` slots are done.

        ``reach``: one past the last position a live slot writes in these steps
        (None: the whole cache); the steps read only :meth:`span` of it.

        Returns:
          What :meth:`fetch` reads: ``(tokens, ran)``, tokens [steps_per_call, B] and the steps run.
        """
        with jax.set_mesh(self.mesh):
            span = self.span(self.cfg.max_len if reach is None else reach)
            self.state, tokens, ran = self._step(
                self._arrays, self.weights, self.state, np.int32(steps), np.int32(stop_after), span
            )
        tokens.copy_to_host_async()
        return tokens, ran

    @staticmethod
    def fetch(outputs: Any) -> Any:
        """The host's copy of a dispatched call's outputs (waiting for them)."""
        return jax.device_get(outputs)

    def reset(self) -> None:
        """Every slot free, after a failure left the decode state unknown."""
        self.state = self._empty_state()

    # Start-up.

    def warmup(self) -> None:
        """Compiles every shape the engine will run: a prefill per bucket, the insert and the step.

        Runs them on dummy rows that are never inserted; the scheduler must be idle.
        """
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
            for span in self.spans:
                self.state, tokens, _ = self._step(
                    self._arrays, self.weights, self.state, np.int32(1), np.int32(1), span
                )
        jax.device_get(tokens)


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
