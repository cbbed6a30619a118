"""Bit allocation over latent channels.

Two ways to decide each latent channel's width (0 = dropped, at most 8):

* :func:`allocate_budget`: from a bit budget that already has the fixed costs (header,
  full-precision sinks and tail, mean) taken out. Every kept channel also pays its own
  metadata: a float16 scale and minimum per token group and, when the basis travels with
  the sequence, its float16 basis column. The allocator spends the budget greedily on the
  largest measured drop in squared reconstruction error per bit spent, looking ahead over
  every width so that the one-off metadata cost of turning a channel on is weighed fairly.
* :func:`allocate_schedule`: an explicit schedule such as the paper's eight equal channel
  groups with widths (8, 4, 2, 1, 1, 0, 0, 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import InvalidInputError
from .quant import MAX_BITS


def allocate_budget(
    distortion: torch.Tensor, budget_bits: float, bits_per_width: int, channel_metadata_bits: int
) -> torch.Tensor:
    """Choose widths that minimise total distortion within ``budget_bits``.

    The rule is greedy: take the affordable (channel, wider width) option with the largest
    error drop per extra bit, the first one on ties (lowest channel, then lowest width), until
    nothing affordable gains. A channel's options depend only on its own width, so while the
    best option is affordable the greedy takes every channel's own sequence of best steps
    (:func:`_channel_steps`) in one global order of their ratios: one sort replaces ~2,000
    steps of a Python loop. Only from the first best step that the budget cannot pay for does
    the loop run, over the few bits left, where the rule may pick a lesser option that fits.

    Args:
        distortion: float64 [channels, 9], squared error of each channel at widths 0..8.
        budget_bits: bits available for codes and per-channel metadata.
        bits_per_width: bits one extra unit of width costs a channel (its quantized tokens).
        channel_metadata_bits: one-off bits of a channel that is kept.

    Returns:
        int64 [channels] widths.
    """
    return AllocationPlan(distortion, bits_per_width, channel_metadata_bits).allocate(budget_bits)


class AllocationPlan:
    """What :func:`allocate_budget` computes before it reads the budget: every channel's greedy
    steps and their global order. Made once, it serves any number of budgets over the same
    table and costs (the candidate splits of :func:`svdq.kv.compress_kv` differ in their
    budget only): :meth:`allocate` gives the widths ``allocate_budget`` gives, by the same
    operations. Read-only once built."""

    def __init__(self, distortion: torch.Tensor, bits_per_width: int, channel_metadata_bits: int) -> None:
        self.table = table = distortion.numpy()
        channels = table.shape[0]
        widths = np.arange(MAX_BITS + 1)
        self.cost = cost = (widths * bits_per_width + np.where(widths > 0, channel_metadata_bits, 0)).astype(np.float64)
        if channels == 0:
            return
        rows, steps, ratios, extras = _channel_steps(table, cost)
        # A best step looks ahead over every width, so the next step of the same channel rates no
        # higher, except by float rounding (tests/test_quant.py has such a case): the greedy then
        # takes it right after the one before, so each step is
        # ordered by the lowest ratio of its channel's steps so far; ties go to the lower channel,
        # then the earlier step, as the greedy's first-best rule does.
        standing = np.minimum.accumulate(ratios, axis=1)
        valid = steps > 0
        order = np.lexsort((np.broadcast_to(np.arange(MAX_BITS), steps.shape)[valid], rows[valid], -standing[valid]))
        self.step_rows, self.step_widths = rows[valid][order], steps[valid][order]
        self.step_extras = extras[valid][order]
        # Spent after each step, summed in the greedy's order (cumsum adds one after another).
        self.spent_after = np.cumsum(self.step_extras)
        self.spent_before = np.concatenate(([0.0], self.spent_after[:-1]))

    def allocate(self, budget_bits: float) -> torch.Tensor:
        """int64 [channels] widths within ``budget_bits`` (:func:`allocate_budget`)."""
        chosen = np.zeros(self.table.shape[0], dtype=np.int64)
        if chosen.size == 0:
            return torch.from_numpy(chosen)
        short = np.flatnonzero(self.step_extras > budget_bits - self.spent_before)
        taken = int(short[0]) if short.size else self.step_extras.size
        # A channel's steps widen it, so its width is the largest step taken.
        np.maximum.at(chosen, self.step_rows[:taken], self.step_widths[:taken])
        spent = float(self.spent_after[taken - 1]) if taken else 0.0
        return torch.from_numpy(_greedy_from(self.table, self.cost, chosen, spent, budget_bits))


def _options(table: np.ndarray, cost: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Extra bits and error drop per extra bit ([rows, 9]; -inf where it gains nothing or is
    not wider) of every width of the channels ``table`` [rows, 9] at widths ``chosen`` [rows]."""
    extra = cost[None, :] - cost[chosen][:, None]
    gain = table[np.arange(table.shape[0]), chosen][:, None] - table
    usable = (np.arange(MAX_BITS + 1)[None, :] > chosen[:, None]) & (gain > 0)
    return extra, np.where(usable, gain / np.maximum(extra, 1e-9), -np.inf)


def _channel_steps(table: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each channel's greedy steps from width 0, [channels, 8] each: the channel, the width
    of its k-th step (0 once it has no more), that step's ratio and extra bits.

    A channel's best step depends only on the width it is at, so :func:`_options` of every
    channel at every width is one [channels, 9, 9] table (the same operations on the same
    values as at one width), and each channel's steps follow its best next widths from 0:
    eight gathers instead of eight passes of ``_options`` (most of the plan at 192 channels)."""
    channels = table.shape[0]
    rows = np.broadcast_to(np.arange(channels)[:, None], (channels, MAX_BITS))
    widths = np.arange(MAX_BITS + 1)
    extra = cost[None, :] - cost[:, None]  # [from, to]: cost[to] - cost[from]
    gain = table[:, :, None] - table[:, None, :]  # [channels, from, to]
    usable = (widths[None, :] > widths[:, None])[None] & (gain > 0)
    ratio = np.where(usable, gain / np.maximum(extra, 1e-9)[None], -np.inf)
    best = ratio.argmax(axis=2)  # the first best, as the greedy's flat argmax within a row
    best_ratio = np.take_along_axis(ratio, best[:, :, None], axis=2)[:, :, 0]
    steps = np.zeros((channels, MAX_BITS), dtype=np.int64)
    ratios = np.full((channels, MAX_BITS), np.inf)
    extras = np.zeros((channels, MAX_BITS))
    current = np.zeros(channels, dtype=np.int64)
    live = np.arange(channels)
    for k in range(MAX_BITS):
        at = current[live]
        step_ratio = best_ratio[live, at]
        gains = step_ratio > -np.inf
        live, at, step_ratio = live[gains], at[gains], step_ratio[gains]
        if not live.size:
            break
        step = best[live, at]
        steps[live, k], ratios[live, k], extras[live, k] = step, step_ratio, extra[at, step]
        current[live] = step
    return rows, steps, ratios, extras


def _greedy_from(table: np.ndarray, cost: np.ndarray, chosen: np.ndarray, spent: float,
                 budget_bits: float) -> np.ndarray:
    """The greedy rule step by step from widths ``chosen`` with ``spent`` bits spent."""
    # Every channel's options depend only on its own chosen width, so only the row that
    # moved is recomputed after a step.
    extra, ratio = _options(table, cost, chosen)
    while True:
        left = budget_bits - spent
        # The best option overall, when affordable, is also the first best among the
        # affordable ones (ties break on the same flat index); only once the budget runs
        # short are the unaffordable options masked out.
        flat = int(np.argmax(ratio))
        row, width = divmod(flat, MAX_BITS + 1)
        if extra[row, width] > left:
            affordable = np.where(extra <= left, ratio, -np.inf)
            flat = int(np.argmax(affordable))
            row, width = divmod(flat, MAX_BITS + 1)
            if affordable[row, width] == -np.inf:
                break
        elif ratio[row, width] == -np.inf:
            break
        spent += float(extra[row, width])
        chosen[row] = width
        extra[row], ratio[row] = (part[0] for part in _options(table[row:row + 1], cost, chosen[row:row + 1]))
    return chosen


def allocate_schedule(schedule: Sequence[int], channels: int) -> torch.Tensor:
    """Split ``channels`` latent channels into ``len(schedule)`` near-equal groups in importance
    order and give each group its width; int64 [channels]."""
    if not schedule:
        raise InvalidInputError("bit schedule must list at least one width")
    if any(int(b) != b or not 0 <= b <= MAX_BITS for b in schedule):
        raise InvalidInputError(f"bit schedule widths must be integers 0..{MAX_BITS}, got {list(schedule)}")
    if len(schedule) > channels:
        raise InvalidInputError(f"bit schedule has {len(schedule)} groups but there are only {channels} channels")
    edges = np.linspace(0, channels, len(schedule) + 1).round().astype(int)
    bits = np.zeros(channels, dtype=np.int64)
    for width, start, stop in zip(schedule, edges[:-1], edges[1:], strict=True):
        bits[start:stop] = int(width)
    return torch.from_numpy(bits)
