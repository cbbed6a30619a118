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

    Args:
        distortion: float64 [channels, 9], squared error of each channel at widths 0..8.
        budget_bits: bits available for codes and per-channel metadata.
        bits_per_width: bits one extra unit of width costs a channel (its quantized tokens).
        channel_metadata_bits: one-off bits of a channel that is kept.

    Returns:
        int64 [channels] widths.
    """
    table = distortion.numpy()
    channels = table.shape[0]
    widths = np.arange(MAX_BITS + 1)
    cost = (widths * bits_per_width + np.where(widths > 0, channel_metadata_bits, 0)).astype(np.float64)
    chosen = np.zeros(channels, dtype=np.int64)
    if channels == 0:
        return torch.from_numpy(chosen)
    # Every channel's options (extra bits and error drop of each larger width) depend only on
    # its own chosen width, so they are kept per row and only the row that moved is
    # recomputed: one [channels, 9] pass per step would cost more than all the rest.
    extra = np.broadcast_to(cost, table.shape).copy()
    ratio = np.empty_like(table)

    def refresh(row: int) -> None:
        current = chosen[row]
        extra[row] = cost - cost[current]
        gain = table[row, current] - table[row]
        usable = (widths > current) & (gain > 0)
        ratio[row] = np.where(usable, gain / np.maximum(extra[row], 1e-9), -np.inf)

    for row in range(channels):
        refresh(row)
    spent = 0.0
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
        refresh(row)
    return torch.from_numpy(chosen)


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
