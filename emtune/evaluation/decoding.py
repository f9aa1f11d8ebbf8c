"""The decode loop of the built-in generation engine: a full batch kept full, on a static KV cache.

Each of the ``B`` rows of the batch holds one sequence (a prompt, then its answer) in its own
slots of a preallocated key/value cache (``B x heads x W x head_dim`` per layer, ``W`` = the
longest prompt + ``max_new_tokens``). A decode step feeds one token per row with that row's
position, writes its key and value at the row's own next slot and attends over the row's slots
through an explicit mask, so rows of different lengths decode together without padding each
other. When a row's answer ends (a stop token, or ``max_new_tokens``), the row is refilled with
the next prompt: prompts are prefilled in groups of similar length (left padded, positions from
the mask, logits of the last position only; jobs come longest prompt first) and their keys and
values copied into the free rows. The samples of one question share a prompt, which is prefilled
once and copied into each of their rows. Once no prompt is left and half the rows are idle,
the batch is compacted to the live rows.

The decode step runs eagerly, not compiled: with the batch as large as free memory allows (hundreds
of rows), a step is bound by reading the weights and the cache, and its kernel launches are shared
by every row; a compiled or graph-captured step would also have to follow a cache width that grows
each step and a batch that shrinks at compaction. ``bench/gpu_eval.py`` shows the difference that
remains (the engine at 16 rows against the full batch).

The model is called as transformers 5 causal LMs are (``cache=``, ``position_ids=``,
``logits_to_keep=``, a ready 4D additive mask); :func:`unsupported_reason` names the models
this does not fit (sliding-window or hybrid attention, encoder-decoder), which fall back to
``model.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from emtune.evaluation.sampling import as_seed_tensor, choose_tokens

#: Upper bound of the automatic batch size (rows decoded together) per device type.
MAX_ROWS = {"cuda": 1024, "cpu": 256}
#: Tokens per prefill forward (bounds the prefill activations).
PREFILL_TOKENS = 16384


@dataclass(frozen=True)
class Job:
    """One sequence to generate: its prompt's token ids and its seed."""

    prompt: list[int]
    seed: int


def unsupported_reason(model: Any) -> str | None:
    """Why the static-cache loop cannot run ``model`` (None when it can)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (only full attention layers are supported)"
    return None


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def kv_shape(model: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder."""
    config = _text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def bytes_per_row(model: Any, width: int, dtype: torch.dtype) -> int:
    """Memory one row costs: its key/value slots plus the per-step logits and sampling buffers."""
    layers, kv_heads, head_dim = kv_shape(model)
    element = torch.tensor([], dtype=dtype).element_size()
    vocab = _text_config(model).vocab_size
    return 2 * layers * kv_heads * head_dim * width * element + vocab * 24


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (the CUDA allocator's view, or the system's available memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            info = dict(line.split(":", 1) for line in handle)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def auto_rows(model: Any, jobs: int, width: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows decoded together: as many as 60% of free memory holds (minus room for a prefill
    group), capped by :data:`MAX_ROWS` and by the number of jobs."""
    hidden = _text_config(model)
    prefill = PREFILL_TOKENS * (hidden.hidden_size + getattr(hidden, "intermediate_size", 0)) * 8
    budget = 0.6 * max(free_memory(device) - prefill, 0)
    rows = int(budget // max(bytes_per_row(model, width, dtype), 1))
    return max(1, min(rows, MAX_ROWS.get(device.type, 256), jobs))


class RowCache:
    """Per-row key/value slots for a decode step (the ``cache=`` object the model writes to).

    ``update`` stores the step's key and value of row ``r`` at slot ``positions[r]`` and returns
    the first ``width`` slots of every row; the step's mask hides the slots a row does not own.
    """

    def __init__(self, layers: int, rows: int, kv_heads: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (rows, kv_heads, slots, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows = torch.arange(rows, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.width = slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.positions] = key_states[:, :, 0]
        values[self.rows, :, self.positions] = value_states[:, :, 0]
        return keys[:, :, : self.width], values[:, :, : self.width]

    def store_prefill(self, layer_idx: int, rows: list[int], keys: torch.Tensor, values: torch.Tensor,
                      lengths: list[int]) -> None:
        """Copy a left-padded prefill's keys/values (group x heads x L x dim) into ``rows``."""
        span = keys.shape[2]
        for i, (row, length) in enumerate(zip(rows, lengths)):
            self.keys[layer_idx][row, :, :length] = keys[i, :, span - length:]
            self.values[layer_idx][row, :, :length] = values[i, :, span - length:]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (compaction), in that order."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.rows = torch.arange(len(rows), device=rows.device)
        self.positions = self.positions.index_select(0, rows)


class DecodeLoop:
    """Generate every job's continuation with ``rows`` rows kept busy (see the module docs).

    ``on_finish(job_index, token_ids, reason)`` is called as each job ends (reason "stop" or
    "length"); :meth:`run` returns the token ids of every job, in job order.
    """

    def __init__(self, model: Any, jobs: list[Job], *, max_new_tokens: int, temperature: float,
                 top_p: float, stop_ids: set[int], pad_id: int, rows: int | None = None,
                 on_finish: Callable[[int, list[int], str], None] | None = None):
        self.model, self.jobs, self.max_new = model, jobs, max_new_tokens
        self.temperature, self.top_p, self.stop_ids, self.pad_id = temperature, top_p, stop_ids, pad_id
        self.on_finish = on_finish
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        longest = max(len(job.prompt) for job in jobs)
        self.slots = longest + max_new_tokens
        self.n_rows = rows or auto_rows(model, len(jobs), self.slots, self.device, self.dtype)
        self.n_rows = max(1, min(self.n_rows, len(jobs)))
        layers, kv_heads, head_dim = kv_shape(model)
        self.cache = RowCache(layers, self.n_rows, kv_heads, self.slots, head_dim, self.dtype, self.device)
        self.order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].prompt))
        self.job_of = [-1] * self.n_rows  # job index per row, -1 = idle
        self.length = [0] * self.n_rows  # tokens in the row's cache
        self.made: list[list[int]] = [[] for _ in jobs]
        self.next_token = torch.full((self.n_rows,), pad_id, dtype=torch.long, device=self.device)
        self.seeds = torch.zeros(self.n_rows, dtype=torch.int64, device=self.device)
        self.steps = torch.zeros(self.n_rows, dtype=torch.int64, device=self.device)
        self.done = 0

    @torch.inference_mode()
    def run(self) -> list[list[int]]:
        """Decode until every job has ended."""
        was_training = self.model.training
        self.model.eval()
        try:
            while self.done < len(self.jobs):
                idle = [r for r in range(self.n_rows) if self.job_of[r] < 0]
                if self.order and (len(idle) >= max(1, self.n_rows // 8) or len(idle) == self.n_rows
                                   or len(idle) >= len(self.order)):
                    self._refill(idle[: len(self.order)])
                elif not self.order and 0 < len(idle) and len(idle) * 2 >= self.n_rows:
                    self._compact()
                if any(job >= 0 for job in self.job_of):
                    self._step()
        finally:
            self.model.train(was_training)
        return self.made

    # -- prefill ---------------------------------------------------------------------------------
    def _refill(self, rows: list[int]) -> None:
        """Prefill the next prompts into ``rows``, in groups of similar length (jobs come longest
        first): a group ends when its distinct prompts fill the token budget or when a prompt is
        under 3/4 of the group's longest."""
        taken = [self.order.pop(0) for _ in rows]
        start, distinct = 0, {tuple(self.jobs[taken[0]].prompt)}
        for end in range(1, len(taken) + 1):
            longest = len(self.jobs[taken[start]].prompt)
            following = None if end == len(taken) else tuple(self.jobs[taken[end]].prompt)
            if following is None or 4 * len(following) < 3 * longest \
                    or len(distinct | {following}) * longest > PREFILL_TOKENS:
                self._prefill(rows[start:end], taken[start:end])
                start, distinct = end, set()
            if following is not None:
                distinct.add(following)

    def _prefill(self, rows: list[int], jobs: list[int]) -> None:
        # Samples of the same question share their prompt: it is computed once and copied.
        unique: dict[tuple[int, ...], int] = {}
        for j in jobs:
            unique.setdefault(tuple(self.jobs[j].prompt), len(unique))
        prompts = list(unique)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        source = [unique[tuple(self.jobs[j].prompt)] for j in jobs]
        lengths = [len(self.jobs[j].prompt) for j in jobs]
        for layer, (keys, values) in enumerate(_layers_of(cache)):
            self.cache.store_prefill(layer, rows, keys[source], values[source], lengths)
        index = torch.tensor(rows, device=self.device)
        self.seeds[index] = as_seed_tensor([self.jobs[j].seed for j in jobs], self.device)
        self.steps[index] = 0
        for row, job, length in zip(rows, jobs, lengths):
            self.job_of[row], self.length[row] = job, length
        logits = out.logits[source, -1]
        tokens = choose_tokens(logits, self.temperature, self.top_p, self.seeds[index], self.steps[index])
        self._accept(rows, tokens)

    # -- decode ----------------------------------------------------------------------------------
    def _step(self) -> None:
        width = min(self.slots, max(n for n, job in zip(self.length, self.job_of) if job >= 0) + 1)
        self.cache.width = width
        lengths = torch.tensor(self.length, device=self.device)
        self.cache.positions = lengths
        slots = torch.arange(width, device=self.device)
        visible = slots.unsqueeze(0) <= lengths.unsqueeze(1)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        out = self.model(input_ids=self.next_token.unsqueeze(1), attention_mask=mask[:, None, None, :],
                         position_ids=lengths.unsqueeze(1), cache=self.cache, use_cache=True)
        for row in range(self.n_rows):
            if self.job_of[row] >= 0:
                self.length[row] += 1
        live = [r for r in range(self.n_rows) if self.job_of[r] >= 0]
        index = torch.tensor(live, device=self.device)
        tokens = choose_tokens(out.logits[index, -1], self.temperature, self.top_p, self.seeds[index],
                               self.steps[index])
        self._accept(live, tokens)

    def _accept(self, rows: list[int], tokens: torch.Tensor) -> None:
        """Record each row's new token; end the rows that stopped or are full."""
        index = torch.tensor(rows, device=self.device)
        self.next_token[index] = tokens
        self.steps[index] += 1
        for row, token in zip(rows, tokens.tolist()):
            job = self.job_of[row]
            made = self.made[job]
            stopped = token in self.stop_ids
            if not stopped:
                made.append(token)
            if stopped or len(made) >= self.max_new:
                self.job_of[row] = -1
                self.done += 1
                if self.on_finish is not None:
                    self.on_finish(job, made, "stop" if stopped else "length")

    def _compact(self) -> None:
        live = [r for r in range(self.n_rows) if self.job_of[r] >= 0]
        index = torch.tensor(live, device=self.device)
        self.cache.keep(index)
        self.next_token, self.seeds, self.steps = (t.index_select(0, index) for t in
                                                   (self.next_token, self.seeds, self.steps))
        self.job_of = [self.job_of[r] for r in live]
        self.length = [self.length[r] for r in live]
        self.n_rows = len(live)


def _layers_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of the cache a prefill forward returned (transformers 5 layers,
    or the legacy tuple of tuples)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]
