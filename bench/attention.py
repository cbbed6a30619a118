"""Attention over compressed keys: speed side by side with dense SDPA, and accuracy on a real model.

Speed (``--part speed``): Llama-3-8B-like decode shapes (32 query heads, 8 KV heads,
head_dim 128, one layer) over 4k..32k tokens, or with ``--shape smollm2`` SmolLM2-135M's (9
query heads, 3 KV heads x 64: the end-to-end decode's model, e.g. ``--tokens 600``). In one process, on one device, each row is
timed with the same harness (warm-up, then the median of ``--repeats`` calls, synchronised on
CUDA): dense attention over uncompressed fp16 and fp32 keys and values with
``torch.nn.functional.scaled_dot_product_attention``, and :func:`svdq.attention.attend` dense
and sparse (1/32 of the tokens) over SVDq keys compressed with the default codec config
(1.5 true bits per element), each with fp16 values and with SVDq latent values
(:data:`svdq.values.DEFAULT_VALUE_CODEC`, which attention reads as latent codes). Keys are synthetic with a decaying spectrum
(a low-rank signal plus noise): speed depends on the shapes and kept channels, not on the
text. Every svdq row is timed twice, marked: ``[kept]`` over sequences that keep what attention
derived between calls (as a server's repeated decode steps do), ``[cold]`` over sequences as
just read from the store, discarded before each call (a sequence's first call), and with
``--cache-states first`` ``[first 2]``: a sequence's first two calls together, just read from the
store, under the budget (where what a first call keeps pays off in the second).
Ratios are against SDPA fp16 of the same length. Key bytes are what each call needs
(``AttentionStats``); the SDPA rows read the fp16/fp32 keys.

Precision (``--part precision``, CPU): the attention-output error of ``precision="bfloat16"``
and ``"float16"`` against the float32 path and all three against the uncompressed keys, with
and without the kept float16 keys (:func:`precision_table`).

Accuracy (``--part accuracy``): SmolLM2-135M-Instruct's own decode, where attention over the
prefix goes through :func:`svdq.attention.attend` (client ``LocalOffload``) and is merged by
log-sum-exp with exact attention over the continuation tokens; continuation dNLL against the
uncompressed model and needle accuracy at ~4k tokens, dense and sparse at 1/8, 1/16, 1/32.

Usage::

    python bench/attention.py --part speed --tokens 4096 8192 --repeats 5
    python bench/attention.py --part speed --shape smollm2 --tokens 600 --batch 1 4 8 --clock cpu --threads 1
    git worktree add /tmp/old HEAD~3 && python bench/attention.py --part speed --baseline-tree /tmp/old/svdq
    python bench/attention.py --part accuracy --needles 6
    python bench/attention.py --part precision --tokens 4096 --queries 16   # bfloat16 vs float32 error
    python bench/attention.py --part speed --device cuda --out /tmp/attention_gpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from svdq import CodecConfig, RopeConfig, compress, to_bytes
from svdq.attention import (
    KEPT_FLOAT16_KEYS,
    KEPT_FLOAT32_KEYS,
    KEPT_KEYS,
    KEPT_LATENT,
    SCORE_KEYS,
    SparsityConfig,
    attend,
    select_backend,
)
from svdq.derived import tensor_bytes
from svdq.values import DEFAULT_VALUE_CODEC, ValueConfig, compress_values, values_to_bytes

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
LLAMA3_ROPE = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position=8192)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One layer's attention shape for the speed part (``--shape``)."""

    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    rope: RopeConfig


#: Row labels of the speed part's cache states, and the calls each timed sample makes.
STATE_LABELS = {"kept": "kept", "cold": "cold", "first": "first 2"}
STATE_CALLS = {"kept": 1, "cold": 1, "first": 2}

#: ``--shape`` choices: the default Llama-3-8B layer, and SmolLM2-135M's (the end-to-end
#: decode's model: 9 query heads, 3 KV heads x 64, RoPE theta 100000).
SHAPES = {
    "llama3-8b": Shape("Llama-3-8B", Q_HEADS, KV_HEADS, HEAD_DIM, LLAMA3_ROPE),
    "smollm2": Shape("SmolLM2-135M", 9, 3, 64, RopeConfig(theta=100000.0)),
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def medians_in_turns(calls: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                     clock: Callable[[], float] = time.perf_counter,
                     resets: dict[str, tuple[Callable[[], None], Callable[[], None]]] | None = None
                     ) -> dict[str, float]:
    """Median seconds of each call, timed in turns (every repeat visits every call once, after
    one warm-up call each), so that load from other work on a shared machine falls on all
    rows alike and their ratios stay meaningful. ``clock``: wall time, or on the CPU
    ``time.thread_time`` (the calling thread's CPU time: on a machine shared with more
    runnable jobs than cores, the time spent waiting for a core is left out). ``resets``:
    per call, what runs untimed before and after each of its calls (a cold call's discarding
    of what attention kept, so that it neither finds nor leaves anything for the others)."""
    resets = resets or {}
    nothing = (lambda: None, lambda: None)

    def timed(name: str, call: Callable[[], object]) -> float:
        before, after = resets.get(name, nothing)
        before()
        start = clock()
        call()
        _synchronize(device)
        elapsed = clock() - start
        after()
        return elapsed

    for name, call in calls.items():
        timed(name, call)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            samples[name].append(timed(name, call))
    return {name: statistics.median(times) for name, times in samples.items()}


def _discarder(derived, objects: list, lift_limit: bool = True) -> tuple[Callable[[], None], Callable[[], None]]:
    """What runs before and after a cold call over ``objects`` (keys, values and values'
    latents): ``derived`` (a tree's ``DERIVED``) drops what attention kept for them, budget
    charge included, and its limit is lifted for the call, so that what the call derives
    evicts nothing the kept rows' sequences hold (with 16 sequences of 32k tokens the cold
    calls' unpacked codes alone pushed the kept rows' float16 keys out) and nothing optional
    is kept (no room without a limit). ``lift_limit=False`` (the first calls' rows) keeps the
    budget in force, so that the calls keep what a server would. A tree older than
    :meth:`svdq.derived.DerivedCache.discard` is discarded with this tree's method (the same
    bookkeeping)."""
    from svdq.derived import DerivedCache

    discard = getattr(derived, "discard", None) or (lambda owner: DerivedCache.discard(derived, owner))
    distinct = list({id(item): item for item in objects}.values())
    limit = derived.limit_bytes

    def before() -> None:
        for item in distinct:
            discard(item)
        if lift_limit:
            derived.limit_bytes = None

    def after() -> None:
        for item in distinct:
            discard(item)
        if lift_limit:
            derived.limit_bytes = limit

    return before, after


def _cached_objects(keys_list: list, values_list: list) -> list:
    """The objects whose ``_cache`` attention fills: keys, values, values' latents."""
    return list(keys_list) + list(values_list) + [v.latent for v in values_list if v.latent is not None]


def synthetic_keys(tokens: int, seed: int = 0, rank: int = 48, kv_heads: int = KV_HEADS,
                   head_dim: int = HEAD_DIM) -> torch.Tensor:
    """Pre-RoPE keys float32 [tokens, kv_heads, head_dim]: low-rank signal with a decaying
    spectrum plus noise, so the SVD basis has something to find, as in real keys (``rank`` at
    most the channel count)."""
    generator = torch.Generator().manual_seed(seed)
    channels = kv_heads * head_dim
    rank = min(rank, channels)
    spectrum = torch.logspace(1, -0.5, rank)
    factors = torch.randn(tokens, rank, generator=generator) * spectrum
    mixing = torch.linalg.qr(torch.randn(channels, rank, generator=generator)).Q.T
    noise = 0.05 * torch.randn(tokens, channels, generator=generator)
    return (factors @ mixing + noise + 0.3).reshape(tokens, kv_heads, head_dim)


def _sequences(compressed, batch: int, device: torch.device, same: bool) -> list:
    """``batch`` entries: one object repeated (queries over one sequence), or distinct objects
    over the same tensors (different sequences: each has its own attention cache, as
    different sequences of a server do, and is attended on its own)."""
    moved = compressed.to(device)
    return [moved] * batch if same else [dataclasses.replace(moved, _cache={}) for _ in range(batch)]


def _distinct_values(values, batch: int, device: torch.device, same: bool) -> list:
    moved = values.to(device)
    if same:
        return [moved] * batch
    if moved.latent is not None:
        return [dataclasses.replace(moved, latent=dataclasses.replace(moved.latent, _cache={})) for _ in range(batch)]
    return [dataclasses.replace(moved) for _ in range(batch)]


def load_tree(folder: Path):
    """The ``svdq`` package of another source tree (e.g. ``git worktree`` or ``git archive`` of
    an earlier commit), imported under another name so both run in this process."""
    spec = importlib.util.spec_from_file_location("svdq_baseline", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"no svdq package at {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["svdq_baseline"] = module
    spec.loader.exec_module(module)
    importlib.import_module("svdq_baseline.attention")
    importlib.import_module("svdq_baseline.values")
    importlib.import_module("svdq_baseline.derived")
    return module


def speed_table(token_counts: list[int], device: torch.device, repeats: int, batches: list[int],
                thread_counts: list[int], same_sequence: bool, baseline_tree=None, clock: str = "wall",
                precisions: tuple[str, ...] = ("bfloat16", "float32"), cache_bytes: int | None = 1 << 30,
                cache_states: tuple[str, ...] = ("kept", "cold"), shape: Shape = SHAPES["llama3-8b"],
                value_kinds: tuple[str, ...] = ("16-bit", "latent"), sdpa_bfloat16: bool = True) -> list[str]:
    value_kinds_wanted = value_kinds
    from svdq.derived import DERIVED
    from svdq.rope import apply_rope

    DERIVED.limit_bytes = cache_bytes
    if baseline_tree is not None:
        # The other tree's own cache under the same budget (without one it would keep no float16 keys).
        baseline_tree.derived.DERIVED.limit_bytes = cache_bytes

    backend = select_backend(device)
    sparse = SparsityConfig(keep_fraction=1 / 32)  # the library defaults: what the service serves
    # PyTorch's CPU SDPA in float16 is several times slower than in float32: the fair CPU
    # baseline is float32 (bfloat16 shown too); on CUDA it is float16.
    baseline_dtype = torch.float16 if device.type == "cuda" else torch.float32
    sdpa_dtypes = [torch.float16, torch.float32] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    if not sdpa_bfloat16 and device.type != "cuda":
        sdpa_dtypes = [torch.float32]  # the baseline alone (bfloat16 SDPA is 4-13x slower on the CPU)
    # The baseline tree's attend with the same precision= as this tree's first, where it takes one
    # (on a CPU without native bfloat16 its default is float32, which keeps no float16 keys); a
    # precision it does not know (float16, before round 11) becomes float32, its choice on such CPUs.
    baseline_precision = {}
    if baseline_tree is not None and "precision" in inspect.signature(baseline_tree.attention.attend).parameters:
        known = getattr(baseline_tree.attention, "PRECISIONS", ())
        baseline_precision = {"precision": precisions[0] if precisions[0] in known else "float32"}
    baseline_name = f"SDPA {str(baseline_dtype).removeprefix('torch.')}"
    rows = [
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"attend backend: {backend}, {shape.name} shapes Hq={shape.q_heads} Hkv={shape.kv_heads} D={shape.head_dim}, batch entries over "
        f"{'one sequence' if same_sequence else 'different sequences'}; median of {repeats} "
        f"({'wall time' if clock == 'wall' else 'CPU time of the timing thread'}), rows of one "
        f"(tokens, batch, threads) timed in turns; attention cache budget "
        f"{'none (library use)' if cache_bytes is None else f'{cache_bytes:,} bytes'}; [kept]: the sequences keep "
        f"what attention derived (repeated calls); [cold]: each call over sequences as just read from the store, "
        f"nothing derived kept for them (the RoPE angle table, shared by every sequence, stays); [first 2]: a "
        f"sequence's first two calls together, from just read from the store, under the budget (what a decode's "
        f"first steps cost); load average before: "
        f"{', '.join(f'{load:.1f}' for load in os.getloadavg())}",
        "",
        f"| tokens | batch | threads | method | median ms | vs {baseline_name} | key bytes read | "
        "key read reduction vs fp16 |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    default_threads = torch.get_num_threads()
    for tokens in token_counts:
        layer = (shape.kv_heads, shape.head_dim)
        pre = synthetic_keys(tokens, 0, 48, *layer)
        positions = torch.arange(tokens)
        post = apply_rope(pre, positions, shape.rope)
        values = torch.randn(tokens, *layer, generator=torch.Generator().manual_seed(1)).half()
        compressed = compress(post.half(), CodecConfig(), rope=shape.rope, key_space="post_rope", positions=positions)
        # Latent values need a spectrum like real values' (flatter than keys'), not i.i.d. noise.
        latent_source = synthetic_keys(tokens, 2, 256, *layer).half()
        latent_values = compress_values(latent_source, ValueConfig(codec=DEFAULT_VALUE_CODEC))
        fp16_bytes = 2 * tokens * shape.kv_heads * shape.head_dim
        for batch in batches:
            keys_list = _sequences(compressed, batch, device, same_sequence)
            value_kinds = []
            if "16-bit" in value_kinds_wanted:
                value_kinds.append(("16-bit V", _distinct_values(compress_values(values), batch, device, same_sequence)))
            if "latent" in value_kinds_wanted:
                value_kinds.append((f"svdq V {latent_values.bits_per_element:.2f} bits",
                                    _distinct_values(latent_values, batch, device, same_sequence)))
            queries = torch.randn(batch, shape.q_heads, shape.head_dim, device=device)
            calls: dict[str, Callable[[], object]] = {}
            resets: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
            read: dict[str, int] = {}
            for dtype in sdpa_dtypes:
                name = f"SDPA {str(dtype).removeprefix('torch.')} keys/values"
                k = post.to(device, dtype).transpose(0, 1)[None].expand(batch, -1, -1, -1)
                v = values.to(device, dtype).transpose(0, 1)[None].expand(batch, -1, -1, -1)
                q = queries.to(dtype)[:, :, None, :]
                calls[name] = lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, enable_gqa=True)
                read[name] = fp16_bytes * (2 if dtype == torch.float32 else 1)
            # Cold and first-call rows attend their own objects (keys and values as just read from
            # the store), discarded before and after each sample: the kept rows' objects keep what
            # they derived.
            fresh_states = [state for state in cache_states if state != "kept"]
            fresh_keys = {state: _sequences(compressed, batch, device, same_sequence) for state in fresh_states}
            fresh_values = {state: {label: _distinct_values(kind[0], batch, device, same_sequence)
                                    for label, kind in value_kinds} for state in fresh_states}
            baseline_kept: dict[str, list] = {}
            for label, sparsity in [("attend svdq dense", None), ("attend svdq sparse 1/32", sparse)]:
                for value_label, values_list in value_kinds:
                    for precision in precisions:
                        stats = attend(queries, keys_list, values_list, sparsity=sparsity, precision=precision).stats[0]
                        name = f"{label}, {value_label}, {precision} ({stats.tokens_attended} tok)"
                        for state in cache_states:
                            state_keys, state_values = ((keys_list, values_list) if state == "kept" else
                                                        (fresh_keys[state], fresh_values[state][value_label]))
                            state_name = f"{name} [{STATE_LABELS[state]}]"
                            calls[state_name] = lambda sparsity=sparsity, values_list=state_values, queries=queries, \
                                keys_list=state_keys, precision=precision, count=STATE_CALLS[state]: [attend(
                                    queries, keys_list, values_list, sparsity=sparsity, precision=precision)
                                    for _ in range(count)]
                            if state != "kept":
                                resets[state_name] = _discarder(DERIVED, _cached_objects(state_keys, state_values),
                                                                lift_limit=state == "cold")
                            read[state_name] = stats.key_bytes_read
                    if baseline_tree is not None:
                        # The same blobs read by the other tree, attended by its own code.
                        blob = values_to_bytes(values_list[0])
                        old_sparsity = None if sparsity is None else baseline_tree.attention.SparsityConfig(
                            **dataclasses.asdict(sparsity))
                        for state in cache_states:
                            old_keys = baseline_tree.from_bytes(to_bytes(compressed)).to(device)
                            old_keys_list = [old_keys] * batch if same_sequence else [
                                baseline_tree.from_bytes(to_bytes(compressed)).to(device) for _ in range(batch)]
                            old_values = [baseline_tree.values.values_from_bytes(blob, device)
                                          for _ in range(1 if same_sequence else batch)]
                            old_values = old_values * batch if same_sequence else old_values
                            if state == "kept":
                                # As this tree's kept rows: one set of key objects for every kept row of the
                                # batch and one of values per value kind, so that its sparse rows find what
                                # its dense rows kept (the float16 keys) as this tree's do.
                                old_keys_list = baseline_kept.setdefault("keys", old_keys_list)
                                old_values = baseline_kept.setdefault(value_label, old_values)
                            old_name = (f"{label}, {value_label}{''.join(', ' + p for p in baseline_precision.values())} "
                                        f"({stats.tokens_attended} tok) [baseline tree, {STATE_LABELS[state]}]")
                            calls[old_name] = lambda old_sparsity=old_sparsity, old_values=old_values, \
                                queries=queries, old_keys_list=old_keys_list, count=STATE_CALLS[state]: [
                                    baseline_tree.attention.attend(queries, old_keys_list, old_values,
                                                                   sparsity=old_sparsity, **baseline_precision)
                                    for _ in range(count)]
                            if state != "kept":
                                resets[old_name] = _discarder(baseline_tree.derived.DERIVED,
                                                              _cached_objects(old_keys_list, old_values),
                                                              lift_limit=state == "cold")
                            read[old_name] = stats.key_bytes_read
            for threads in thread_counts:
                torch.set_num_threads(threads or default_threads)
                medians = medians_in_turns(calls, device, repeats,
                                           time.perf_counter if clock == "wall" else time.thread_time, resets)
                baseline = medians[f"{baseline_name} keys/values"]
                for name, seconds in medians.items():
                    rows.append(f"| {tokens} | {batch} | {threads or default_threads} | {name} | {seconds * 1e3:.3f} | "
                                f"{seconds / baseline:.2f}x | {read[name]:,} | {fp16_bytes / read[name]:.1f}x |")
            torch.set_num_threads(default_threads)
        # What attention keeps between calls for this layer (svdq.derived), against the layer's size.
        cached = tensor_bytes(keys_list[0]._cache)
        distinct = list({id(item): item for item in keys_list}.values())
        held = sum(KEPT_KEYS in item._cache or KEPT_FLOAT16_KEYS in item._cache for item in distinct)
        held_float32 = sum(KEPT_FLOAT32_KEYS in item._cache for item in distinct)
        scored = sum((SCORE_KEYS, sparse.score_channels) in item._cache for item in distinct)
        latent_list = value_kinds[-1][1] if "latent" in value_kinds_wanted else []
        latent_cached = tensor_bytes(latent_list[0].latent._cache) if latent_list else 0
        latent_held = sum(KEPT_LATENT in item.latent._cache for item in {id(v): v for v in latent_list}.values())
        rows.append(f"| {tokens} | | | (svdq keys: {compressed.bits_per_element:.3f} bits/element, "
                    f"{compressed.kept_bits.numel()} of {compressed.channels} latent channels kept; attention cache "
                    f"{cached:,} bytes for the first sequence = {cached / compressed.nbytes:.2f}x the compressed keys; "
                    f"{held} of {len(distinct)} sequences hold float16 keys, {held_float32} float32 keys, {scored} the score "
                    f"keys; svdq V: "
                    f"{latent_values.latent.kept_bits.numel()} latent channels, attention cache {latent_cached:,} bytes "
                    f"for the first sequence = {latent_cached / latent_values.nbytes:.2f}x the compressed values, "
                    f"{latent_held} of {len(latent_list)} hold the float32 latent; this tree's attention cache so far: "
                    f"{DERIVED.evictions} owners cleared whole, {DERIVED.optional_evictions} optional tensors dropped, "
                    f"{sum(not item._cache for item in distinct)} of {len(distinct)} key objects hold nothing) | | | | |")
    rows.append("")
    rows.append(f"load average after: {', '.join(f'{load:.1f}' for load in os.getloadavg())}")
    return rows


def precision_table(token_counts: list[int], queries_per_case: int, cache_bytes: int | None) -> list[str]:
    """Attention-output error of the bfloat16 products and of the float16-rounded keys against
    the exact float32 path and all against attention over the uncompressed keys, on the speed part's Llama-3-8B-like
    layer (CPU, one layer, 16-bit values).

    Queries are peaked like a model's: each points at one key (its post-RoPE direction at a
    random sharpness) plus noise, so that the softmax concentrates on few tokens, where key
    errors show (uniform random queries average them away). Errors are relative L2 norms over
    each query's [Hq, D] output; the table gives median and maximum over the queries.
    """
    from svdq.attention import PRECISIONS
    from svdq.derived import DERIVED
    from svdq.rope import apply_rope

    budget = f"{cache_bytes:,} bytes" if cache_bytes is not None else "none (no float16 keys kept)"
    rows = [
        f"shapes Hq={Q_HEADS} Hkv={KV_HEADS} D={HEAD_DIM}, svdq keys at the default 1.5 bits, 16-bit values; "
        f"{queries_per_case} peaked queries per row; attention cache budget {budget}",
        "",
        "| tokens | attention | precision | kept float16 keys | error vs float32 path (median / max) | "
        "error vs uncompressed keys (median / max) | extra / compression error (median / max) | "
        "max abs lse diff vs float32 path |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    limit = DERIVED.limit_bytes
    for tokens in token_counts:
        generator = torch.Generator().manual_seed(tokens)
        pre = synthetic_keys(tokens)
        positions = torch.arange(tokens)
        post = apply_rope(pre, positions, LLAMA3_ROPE)
        values = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=generator).half()
        compressed = compress(post.half(), CodecConfig(), rope=LLAMA3_ROPE, key_space="post_rope", positions=positions)
        stored_values = compress_values(values)
        targets = torch.randint(0, tokens, (queries_per_case, Q_HEADS), generator=generator)
        heads = torch.arange(Q_HEADS) // (Q_HEADS // KV_HEADS)
        direction = post[targets, heads[None, :]]
        direction = direction / direction.norm(dim=-1, keepdim=True)
        sharpness = torch.empty(queries_per_case, Q_HEADS, 1).uniform_(0.5, 4.0, generator=generator)
        queries = sharpness * direction * HEAD_DIM**0.5 + torch.randn(queries_per_case, Q_HEADS, HEAD_DIM,
                                                                        generator=generator)
        exact = torch.nn.functional.scaled_dot_product_attention(
            queries[:, :, None].double(), post.double().transpose(0, 1)[None].expand(queries_per_case, -1, -1, -1),
            values.double().transpose(0, 1)[None].expand(queries_per_case, -1, -1, -1), enable_gqa=True)[:, :, 0]
        for label, sparsity in [("dense", None), ("sparse 1/32", SparsityConfig(keep_fraction=1 / 32))]:
            results = {}
            for precision in PRECISIONS:
                # Without a budget nothing is kept: a "kept" row would repeat the cold one.
                keeps = precision != "float32" and sparsity is None and cache_bytes is not None
                for kept in ([False, True] if keeps else [False]):
                    DERIVED.clear()
                    DERIVED.limit_bytes = cache_bytes if kept else None
                    keys = dataclasses.replace(compressed, _cache={})
                    if kept:
                        for _ in range(2):  # dense calls keep them from the second on
                            attend(queries[:1], [keys], [stored_values], precision=precision)
                    # One query per call: decode, and each query selects its own tokens.
                    answers = [attend(queries[b:b + 1], [keys], [stored_values], sparsity=sparsity,
                                      precision=precision) for b in range(queries_per_case)]
                    results[(precision, kept)] = (torch.cat([answer.output for answer in answers]).double(),
                                                  torch.cat([answer.lse for answer in answers]).double(),
                                                  KEPT_KEYS in keys._cache or KEPT_FLOAT16_KEYS in keys._cache)
            reference, reference_lse, _ = results[("float32", False)]
            compression = ((reference - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1))
            for (precision, _), (out, lse, held) in results.items():
                extra = (out - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
                total = (out - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
                share = extra / compression
                rows.append(
                    f"| {tokens} | {label} | {precision} | {'yes' if held else 'no'} | "
                    f"{extra.median():.2e} / {extra.max():.2e} | {total.median():.4f} / {total.max():.4f} | "
                    f"{share.median():.2%} / {share.max():.2%} | {(lse - reference_lse).abs().max():.2e} |")
    DERIVED.clear()
    DERIVED.limit_bytes = limit
    return rows


def _offloaded_prefix_attention(compressed_layers, sparsity, totals, precision=None):
    """A harness AttentionFunction: attention over the compressed prefix by ``attend``,
    merged by log-sum-exp with exact causal attention over the tokens after the prefix."""
    from svdq.attention import merge_attention

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        keys_c, values_c = compressed_layers[module.layer_idx]
        prefix = keys_c.num_tokens
        queries = query[0].transpose(0, 1).float()  # [q, Hq, D]
        count, q_heads, head_dim = queries.shape
        scale = scaling if scaling is not None else head_dim**-0.5
        local_keys = key[0, :, prefix:].float()  # [Hkv, L, D], exact keys after the prefix
        local_values = value[0, :, prefix:].float()
        ratio = q_heads // local_keys.shape[0]
        local = local_keys.shape[1]
        scores = torch.einsum("qhd,hld->qhl", queries, local_keys.repeat_interleave(ratio, 0)) * scale
        visible = torch.arange(local)[None, :] <= torch.arange(local - count, local)[:, None]  # causal
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        local_lse = torch.logsumexp(scores, dim=-1)
        local_out = torch.einsum("qhl,hld->qhd", torch.softmax(scores, -1), local_values.repeat_interleave(ratio, 0))
        remote = attend(queries, [keys_c] * count, [values_c] * count, scale=scale, sparsity=sparsity,
                        precision=precision)
        for stats in remote.stats:
            totals["read"] += stats.key_bytes_read
            totals["fp16"] += stats.dense_fp16_key_bytes
            totals["attended"] += stats.tokens_attended
            totals["total"] += stats.tokens_total
        output, _ = merge_attention(local_out, local_lse, remote.output, remote.lse)
        return output.to(query.dtype)[None], None

    return attention


def _progress(message: str, started: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)


def _compress_prefix(prefix, codec: CodecConfig, rope: RopeConfig):
    return [
        (compress(keys, codec, positions=prefix.positions, rope=rope, key_space="post_rope"), compress_values(values))
        for keys, values in zip(prefix.keys, prefix.values, strict=True)
    ]


def accuracy_table(context_tokens: int, continuation: int, needles: int, codec: CodecConfig,
                   check_path: bool = False, precisions: tuple[str | None, ...] = (None,),
                   sparse_fractions: tuple[int, ...] = (8, 16, 32)) -> list[str]:
    """Continuation dNLL and needle accuracy of SmolLM2 with prefix attention done by attend()."""
    from svdq_client import evaluation as harness  # text, prefill, NLL, needle cases
    from svdq_client.models import load_smollm2

    model, tokenizer = load_smollm2(torch.float32)
    model.eval()
    rope = RopeConfig.from_hf_config(model.config)
    configs = [("fp16 passthrough via attend (checks the path)", CodecConfig(method="fp16"), None)] if check_path else []
    configs += [(f"svdq {codec.bits_per_element} bits, dense", codec, None)] + [
        (f"svdq {codec.bits_per_element} bits, sparse 1/{fraction}", codec, SparsityConfig(keep_fraction=1 / fraction))
        for fraction in sparse_fractions]
    # Each configuration with each of attend's precisions (None: its default on this device).
    configs = [(label if precision is None else f"{label}, {precision}", config, sparsity, precision)
               for label, config, sparsity in configs for precision in precisions]
    rows = [
        f"SmolLM2-135M-Instruct, float32, CPU; prefix {context_tokens} tokens of {harness.TEXT_SOURCE}; "
        f"NLL of the next {continuation} tokens (mean over tokens 2..{continuation}); "
        f"{needles} needle cases at ~{context_tokens} tokens. Prefix attention by svdq.attention.attend "
        "(torch backend), merged with exact attention over the later tokens.",
        "",
        "| prefix keys | continuation NLL | dNLL vs uncompressed | needles found | key bytes read vs fp16 | tokens attended |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    with torch.no_grad():
        ids = harness.text_tokens(tokenizer, context_tokens + continuation)
        prefix = harness.prefill(model, ids[:, :context_tokens])
        continuation_ids = ids[:, context_tokens:]
        base_nll = harness.continuation_nll(model, prefix, continuation_ids)
        _progress(f"uncompressed NLL {base_nll:.4f}")
        cases = harness.needle_cases(tokenizer, context_tokens, count=needles) if needles else []
        base_found = 0
        case_prefixes = []
        for case in cases:
            case_prefix = harness.prefill(model, case.prefix_ids)
            case_prefixes.append(case_prefix)
            base_found += harness.needle_found(
                harness.greedy_answer(model, tokenizer, case_prefix, case.question_ids), case)
            _progress(f"uncompressed needle case at depth {case.depth:.2f}")
        rows.append(f"| uncompressed (model's own attention) | {base_nll:.4f} | 0 | {base_found}/{len(cases)} | 1x | all |")
        compressed_cache: dict[str, list] = {}
        for label, config, sparsity, precision in configs:
            totals = {"read": 0, "fp16": 0, "attended": 0, "total": 0}
            key = repr(config)
            if key not in compressed_cache:
                compressed_cache[key] = [_compress_prefix(prefix, config, rope)] + [
                    _compress_prefix(case_prefix, config, rope) for case_prefix in case_prefixes]
                _progress(f"compressed prefixes for {label}")
            layers = compressed_cache[key]
            nll = harness.continuation_nll(model, prefix, continuation_ids,
                                           attention=_offloaded_prefix_attention(layers[0], sparsity, totals,
                                                                                 precision))
            _progress(f"{label}: NLL {nll:.4f}")
            found = 0
            for case, case_prefix, case_layers in zip(cases, case_prefixes, layers[1:], strict=True):
                answer = harness.greedy_answer(model, tokenizer, case_prefix, case.question_ids,
                                               attention=_offloaded_prefix_attention(case_layers, sparsity, totals,
                                                                                     precision))
                found += harness.needle_found(answer, case)
                _progress(f"{label}: needle at depth {case.depth:.2f} answered {answer!r}")
            bits = sum(item[0].nbytes for item in layers[0]) * 8 / sum(
                item[0].num_tokens * item[0].channels for item in layers[0])
            rows.append(f"| {label} ({bits:.2f} true bits/elem) | {nll:.4f} | {nll - base_nll:+.4f} | "
                        f"{found}/{len(cases)} | {totals['fp16'] / max(1, totals['read']):.1f}x | "
                        f"{totals['attended'] / max(1, totals['total']):.3f} |")
    return rows


def emit(lines: list[str], out: Path | None) -> None:
    """Print the table's ``lines`` and write them to ``out`` too when given (``--out``)."""
    text = "\n".join(lines)
    print(text)
    if out:
        out.write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["speed", "accuracy", "precision", "all"], default="all")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b",
                        help="speed part: the layer's attention shape (smollm2: 9 query heads, 3 KV heads x 64, as "
                             "the end-to-end decode)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="entries per attend call (speed part)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="torch intra-op threads for the speed part; 0 = torch's default")
    parser.add_argument("--same-sequence", action="store_true",
                        help="speed part: every batch entry over one sequence (a prompt chunk over an offloaded "
                             "prefix) instead of different sequences (batched decode)")
    parser.add_argument("--baseline-tree", type=Path,
                        help="speed part: the svdq/ folder of another source tree (an earlier commit); its attend "
                             "runs the same blobs in the same turns, rows marked [baseline tree]")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="speed part: wall time, or (CPU only) the timing thread's CPU time, steadier on a "
                             "machine shared with more runnable jobs than cores")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--context", type=int, default=4096, help="prefix tokens for the accuracy part")
    parser.add_argument("--continuation", type=int, default=256, help="scored continuation tokens")
    parser.add_argument("--bits", type=float, default=1.5, help="svdq true bits per key element (accuracy part)")
    parser.add_argument("--needles", type=int, default=6, help="needle cases")
    parser.add_argument("--check-path", action="store_true",
                        help="accuracy part: add an fp16-passthrough row (should match the uncompressed model)")
    parser.add_argument("--queries", type=int, default=32, help="peaked queries per row of the precision part")
    parser.add_argument("--precisions", nargs="+", choices=["bfloat16", "float32", "float16"],
                        default=["bfloat16", "float32"],
                        help="speed part: attend's precision= for the svdq rows (float16: float32 products over "
                             "float16-rounded keys; a baseline tree without it runs float32)")
    parser.add_argument("--accuracy-precisions", action="store_true",
                        help="accuracy part: every row once per --precisions (default: attend's default only)")
    parser.add_argument("--sparse-fractions", type=int, nargs="*", default=[8, 16, 32],
                        help="accuracy part: sparse rows at keep_fraction 1/N")
    parser.add_argument("--attention-cache-bytes", type=int, default=1 << 30,
                        help="limit of the attention cache (svdq.derived.DERIVED) for the speed and precision parts, "
                             "as the server sets it (svdq-server --attention-cache-bytes, default 1 GiB); -1: no limit "
                             "(library use), which keeps no bfloat16 keys")
    parser.add_argument("--cache-states", nargs="+", choices=list(STATE_LABELS), default=["kept", "cold"],
                        help="speed part: svdq rows with what attention derived kept between calls, cold "
                             "(every call over sequences with nothing kept, as just read from the store), and/or "
                             "first (a sequence's first two calls together, under the budget: what a decode's "
                             "first steps cost; its ratio to SDPA is of two calls to one)")
    parser.add_argument("--value-kinds", nargs="+", choices=["16-bit", "latent"], default=["16-bit", "latent"],
                        help="speed part: svdq rows with 16-bit values and/or SVDq latent values")
    parser.add_argument("--no-sdpa-bfloat16", action="store_true",
                        help="speed part (CPU): leave out the bfloat16 SDPA row (4-13x slower than float32's)")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.clock == "cpu" and (device.type != "cpu" or args.threads != [1]):
        # thread_time counts the calling thread only: other intra-op threads and a GPU would be missed.
        parser.error("--clock cpu needs --device cpu and --threads 1; use --clock wall otherwise")
    torch.manual_seed(0)
    lines: list[str] = []
    if args.part in ("speed", "all"):
        lines += ["## Speed", ""] + speed_table(args.tokens, device, args.repeats, args.batch, args.threads,
                                                    args.same_sequence,
                                                    load_tree(args.baseline_tree) if args.baseline_tree else None,
                                                    args.clock, tuple(args.precisions),
                                                    None if args.attention_cache_bytes < 0 else args.attention_cache_bytes,
                                                    tuple(args.cache_states), SHAPES[args.shape],
                                                    tuple(args.value_kinds), not args.no_sdpa_bfloat16) + [""]
    if args.part in ("precision", "all"):
        lines += ["## Precision of the bfloat16 and float16 paths (CPU)", ""]
        lines += precision_table(args.tokens, args.queries,
                                 None if args.attention_cache_bytes < 0 else args.attention_cache_bytes) + [""]
    if args.part in ("accuracy", "all"):
        lines += ["## Accuracy (SmolLM2-135M-Instruct)", ""]
        lines += accuracy_table(args.context, args.continuation, args.needles, CodecConfig(bits_per_element=args.bits),
                                args.check_path, tuple(args.precisions) if args.accuracy_precisions else (None,),
                                tuple(args.sparse_fractions)) + [""]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
