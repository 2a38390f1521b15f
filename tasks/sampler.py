"""The multi-task mixture: which task each step trains, and on which examples.

Everything is a pure function of ``(seed, step)``: a run resumed at step ``s``
sees exactly the batches an uninterrupted run sees, with no sampler state to
checkpoint. Two counter-based streams make that cheap:

* the schedule: the task of each step, drawn from the rates in chunks of
  ``CHUNK`` steps, each chunk from its own ``default_rng([seed, 0, chunk])``;
* the order: each task walks through its examples in a fresh permutation per
  epoch, from ``default_rng([seed, 1, task_key, epoch])``. A task's ``k``-th
  batch is positions ``k*B .. k*B+B-1`` of that endless walk, where ``k``
  (how often the task was drawn before this step) comes from per-chunk counts.

Per step that is O(1) amortised: chunk counts are kept as a running prefix
sum, and the few chunks and permutations in use are cached.
"""

import collections
import hashlib

import numpy as np

CHUNK = 1024
_SCHEDULE, _ORDER = 0, 1  # stream tags, so the two streams never share a seed

MIXTURE_FORMS = "temperature:T, proportional:K, uniform or weights:a=1,b=3"


def mixture_rates(spec: str, sizes: dict[str, int]) -> dict[str, float]:
    """Returns each task's share of training steps under a ``--mixture`` spec.

    Args:
      spec: ``temperature:T`` (rates proportional to size**(1/T); T=1 is
        examples-proportional, large T tends to uniform), ``proportional:K``
        (proportional to size, each size capped at K), ``uniform``, or
        ``weights:a=1,b=3`` (every task named once, weights >= 0, not all 0).
      sizes: the number of training examples of each task.

    Returns:
      Rates by task name, summing to 1.

    Raises:
      ValueError: a malformed spec, or sizes or weights it cannot use.
    """
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"Task {name!r} has {size} training examples; a mixture needs at least 1.")
    if not sizes:
        raise ValueError("The mixture has no tasks; give at least one task.")
    form, _, arg = spec.strip().partition(":")
    names = list(sizes)
    if form == "uniform" and not arg:
        weights = [1.0] * len(names)
    elif form == "temperature":
        t = _positive_number(spec, arg)
        weights = [float(sizes[n]) ** (1.0 / t) for n in names]
    elif form == "proportional":
        cap = _positive_number(spec, arg)
        weights = [float(min(sizes[n], cap)) for n in names]
    elif form == "weights":
        given = _parse_weights(spec, arg, names)
        weights = [given[n] for n in names]
    else:
        raise ValueError(f"Mixture {spec!r} is not accepted; use {MIXTURE_FORMS}.")
    total = sum(weights)
    return {n: w / total for n, w in zip(names, weights)}


def _positive_number(spec: str, arg: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"Mixture {spec!r} needs a positive number after ':'; use {MIXTURE_FORMS}.")
    return value


def _parse_weights(spec: str, arg: str, names: list[str]) -> dict[str, float]:
    weights = {}
    for item in arg.split(","):
        name, eq, value = (part.strip() for part in item.partition("="))
        try:
            weight = float(value) if eq else float("nan")
        except ValueError:
            weight = float("nan")
        if not 0 <= weight < float("inf"):
            raise ValueError(f"Mixture weight {item.strip()!r} in {spec!r} is not accepted; use NAME=W with W >= 0.")
        if name not in names:
            raise ValueError(
                f"Mixture {spec!r} weights task {name!r}, which is not trained; tasks are {', '.join(names)}."
            )
        if name in weights:
            raise ValueError(f"Mixture {spec!r} weights task {name!r} twice; name each task once.")
        weights[name] = weight
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"Mixture {spec!r} gives no weight to task {missing[0]!r}; name every task.")
    if sum(weights.values()) == 0:
        raise ValueError(f"Mixture {spec!r} has all weights 0; give at least one a positive weight.")
    return weights


class MixtureSampler:
    """Task-homogeneous batches from a mixture, as a pure function of the step.

    Tasks are ordered by name, so the same tasks give the same schedule in
    whatever order they were listed. A task's permutations depend only on the
    seed, its name and the epoch, not on the other tasks.

    Args:
      sizes: the number of training examples of each task.
      rates: each task's share of steps (``mixture_rates``).
      batch_size: the global batch size B.
      seed: the run's seed.
      process_index: which process this is, for multi-host data loading.
      process_count: how many processes share each global batch; each gets
        a contiguous slice of B // process_count examples.
    """

    def __init__(
        self,
        sizes: dict[str, int],
        rates: dict[str, float],
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if set(sizes) != set(rates):
            raise ValueError(
                f"Mixture rates name tasks {sorted(rates)} but sizes name {sorted(sizes)}; they must match."
            )
        if batch_size < 1 or process_count < 1 or batch_size % process_count:
            raise ValueError(
                f"Batch size {batch_size} is not accepted for {process_count} processes; "
                f"it must be a positive multiple of the process count."
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"Process index {process_index} is not accepted; it must be in [0, {process_count}).")
        self.names = sorted(sizes)
        self.sizes = np.array([sizes[n] for n in self.names], dtype=np.int64)
        probs = np.array([rates[n] for n in self.names], dtype=np.float64)
        if (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"Mixture rates {rates} are not accepted; they must be >= 0, not all 0.")
        if ((probs > 0) & (self.sizes < 1)).any():
            raise ValueError(f"Every task with a positive rate needs examples; sizes are {sizes}.")
        if seed < 0:
            raise ValueError(f"Seed {seed} is not accepted; it must be >= 0.")
        self._cdf = np.cumsum(probs / probs.sum())
        # Rounding can leave the cdf's end a hair below 1; such a draw goes to
        # the last task that may be drawn at all.
        self._last_drawable = int(np.flatnonzero(probs > 0)[-1])
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        # A task's stream depends on its name, not its position among the tasks.
        self._task_keys = [
            int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "big") for n in self.names
        ]
        # _before[c][t]: how often task t was drawn in chunks 0..c-1; grows on demand.
        self._before = [np.zeros(len(self.names), dtype=np.int64)]
        self._chunks = collections.OrderedDict()  # chunk -> (task ids, draws before in chunk)
        self._perms = collections.OrderedDict()  # (task, epoch) -> permutation

    def task_at(self, step: int) -> str:
        """Returns the name of the task trained at ``step``."""
        ids, _ = self._chunk(step // CHUNK)
        return self.names[ids[step % CHUNK]]

    def batch_at(self, step: int) -> tuple[str, np.ndarray]:
        """Returns the task of ``step`` and this process's example indices.

        Returns:
          ``(task_name, indices)``: int64 [batch_size // process_count]
          indices into the task's training split; this process's contiguous
          slice of the global batch.
        """
        if step < 0:
            raise ValueError(f"Step {step} is not accepted; steps start at 0.")
        chunk, offset = divmod(step, CHUNK)
        ids, draws_in_chunk = self._chunk(chunk)
        task = int(ids[offset])
        draws = int(self._before[chunk][task] + draws_in_chunk[offset])
        local = self.batch_size // self.process_count
        start = draws * self.batch_size + self.process_index * local
        positions = start + np.arange(local, dtype=np.int64)  # [B_local] in the task's walk
        size = int(self.sizes[task])
        epochs, offsets = np.divmod(positions, size)
        indices = np.empty(local, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            indices[here] = self._perm(task, int(epoch))[offsets[here]]
        return self.names[task], indices

    def _chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """The task ids of one chunk's steps, and each step's draws earlier in the chunk."""
        while len(self._before) <= chunk:  # extend the prefix counts in order, once
            c = len(self._before) - 1
            ids, _ = self._chunk_draws(c)
            self._before.append(self._before[c] + np.bincount(ids, minlength=len(self.names)))
        return self._chunk_draws(chunk)

    def _chunk_draws(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        if chunk in self._chunks:
            self._chunks.move_to_end(chunk)
            return self._chunks[chunk]
        rng = np.random.default_rng([self.seed, _SCHEDULE, chunk])
        u = rng.random(CHUNK)
        ids = np.minimum(np.searchsorted(self._cdf, u, side="right"), self._last_drawable)
        # draws[j] = #{j' < j : ids[j'] == ids[j]}, by a stable sort per task.
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        first = np.searchsorted(sorted_ids, sorted_ids, side="left")  # start of each run
        draws = np.empty(CHUNK, dtype=np.int64)
        draws[order] = np.arange(CHUNK) - first
        self._chunks[chunk] = (ids, draws)
        if len(self._chunks) > 8:
            self._chunks.popitem(last=False)
        return ids, draws

    def _perm(self, task: int, epoch: int) -> np.ndarray:
        key = (task, epoch)
        if key in self._perms:
            self._perms.move_to_end(key)
            return self._perms[key]
        rng = np.random.default_rng([self.seed, _ORDER, self._task_keys[task], epoch])
        size = int(self.sizes[task])
        # int32 below 2**31 examples: half the memory of rng.permutation(size), the same order (it shuffles alike).
        perm = rng.permutation(np.arange(size, dtype=np.int32 if size < 2**31 else np.int64))
        self._perms[key] = perm
        if len(self._perms) > 2 * len(self.names) + 2:
            self._perms.popitem(last=False)
        return perm
