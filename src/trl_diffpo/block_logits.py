"""The forward passes of one denoising step: the logits of each active row's current block, with or without a cache.

:func:`trl_diffpo.generation.diffusion_generate` asks :class:`BlockLogits` at every step for the ``(rows, block,
vocab)`` logits of the rows still decoding. Only the current blocks' logits are ever computed (the backbone's
``logits_positions``). Three modes (``cache=``):

- ``"none"``: one forward of the whole canvas of every active row (exact: every position sees the current latent).
- ``"prefix"`` (Fast-dLLM's prefix cache): at a row's block start, one full forward that also stores the keys/values
  of every canvas position (:class:`~trl_diffpo.kv_cache.CanvasKVCache`); the other steps of the block forward only
  the block and everything after it, attending to the stored keys/values of the positions before the block.
- ``"dual"`` (Fast-dLLM's dual cache): the same, but the later steps forward only the current block and attend to the
  stored keys/values of the positions before *and* after it.

``cache_refresh=N`` also refreshes (full forward) every ``N`` steps inside a block. A shifted-logits model (Dream:
position ``i`` predicts ``i + 1``) needs the hidden state just before the block, so its windows start one position
earlier (that position is recomputed, not read from the cache).

Rows may sit in different blocks and at different steps (adaptive samplers, per-row thresholds). Rows that refresh go
into one full forward; in ``"dual"`` mode all other rows share one window forward (their windows have the same
length wherever they are); in ``"prefix"`` mode the window length depends on the block, so there is one window
forward per distinct block. A step therefore costs one to ``1 + num_blocks`` forward calls (each carrying its own
rows; every row still takes one forward per step, so NFE counts are unchanged); :attr:`BlockLogits.forward_calls`
counts them. Rows that are done leave the batch as in ``"none"``; the cache then works on a copy of the remaining
rows' slots (``CanvasKVCache.rows``).
"""

from __future__ import annotations

import torch

from .backbones import DiffusionBackbone, check_cache_support
from .kv_cache import CanvasKVCache

CACHE_NONE = "none"
CACHE_PREFIX = "prefix"
CACHE_DUAL = "dual"
CACHE_MODES = (CACHE_NONE, CACHE_PREFIX, CACHE_DUAL)
_REFRESH = -1  # group key of the rows that take a full forward this step


def check_cache_options(backbone: DiffusionBackbone, cache: str, cache_refresh: int | None) -> None:
    """Validate ``cache`` / ``cache_refresh``; raise a ``ValueError`` naming the model class if it cannot be cached."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache={cache!r} is not supported; choose one of {', '.join(CACHE_MODES)}.")
    if cache_refresh is not None and (isinstance(cache_refresh, bool) or not isinstance(cache_refresh, int)):
        raise ValueError(f"cache_refresh must be None or a positive integer (steps), got {cache_refresh!r}.")
    if cache_refresh is not None and cache_refresh <= 0:
        raise ValueError(f"cache_refresh must be None or a positive integer (steps), got {cache_refresh}.")
    if cache != CACHE_NONE:
        check_cache_support(backbone, cache)


class BlockLogits:
    """Computes the current blocks' logits of the active rows, one denoising step at a time.

    Args:
        backbone: the model adapter.
        cache: ``"none"``, ``"prefix"`` or ``"dual"`` (see the module docstring).
        cache_refresh: with a cache, also refresh every this many steps inside a block (``None``: block starts only).
        batch_size, prompt_length, block_length: the decoding shape.
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        cache: str,
        cache_refresh: int | None,
        batch_size: int,
        prompt_length: int,
        block_length: int,
        device: torch.device,
    ):
        self.backbone, self.mode, self.refresh = backbone, cache, cache_refresh
        self.prompt_length, self.block_length = prompt_length, block_length
        self.shift = 1 if backbone.logits_shift else 0
        self.kv_cache = CanvasKVCache(batch_size) if cache != CACHE_NONE else None
        self.offsets = torch.arange(block_length, device=device)
        self.forward_calls = 0

    def plan(self, row_block: torch.Tensor, row_step_in_block: torch.Tensor) -> list[tuple[int, list[int]]]:
        """Group the active rows (local indices) by the forward that serves them: ``[(key, rows), ...]`` with key
        ``-1`` for a full (refreshing) forward, else the block index (``"prefix"``) or ``0`` (``"dual"``)."""
        if self.mode == CACHE_NONE:
            return [(_REFRESH, list(range(row_block.shape[0])))]
        refresh = row_step_in_block == 0
        if self.refresh is not None:
            refresh = refresh | (row_step_in_block % self.refresh == 0)
        window_key = row_block if self.mode == CACHE_PREFIX else torch.zeros_like(row_block)
        groups: dict[int, list[int]] = {}
        for local, key in enumerate(torch.where(refresh, _REFRESH, window_key).tolist()):  # one host sync
            groups.setdefault(key, []).append(local)
        return sorted(groups.items())

    def __call__(
        self,
        plan: list[tuple[int, list[int]]],
        rows: torch.Tensor | None,
        row_canvas: torch.LongTensor,
        row_mask: torch.Tensor | None,
        row_block: torch.Tensor,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(block_logits (rows, block, vocab), last-layer hidden states or None)`` for the active rows.

        ``rows`` are the active rows' batch indices (``None``: every row of the batch, in order); ``output_hidden_states``
        is only asked for on a step where every row refreshes (the first one)."""
        num_rows = row_canvas.shape[0]
        block_start = self.prompt_length + row_block * self.block_length  # (rows,) canvas index of the block
        results = []
        for key, local_rows in plan:
            whole = len(local_rows) == num_rows
            index = None if whole else torch.tensor(local_rows, device=row_canvas.device)

            def take(tensor, index=index):
                return tensor if index is None or tensor is None else tensor[index]

            cache_rows = rows if index is None else (index if rows is None else rows[index])
            starts = take(block_start)
            self.forward_calls += 1
            if key == _REFRESH:
                output = self.backbone(
                    take(row_canvas),
                    take(row_mask),
                    output_hidden_states=output_hidden_states,
                    logits_positions=starts[:, None] + self.offsets,
                    cache=None if self.kv_cache is None else self.kv_cache.record(cache_rows),
                )
            else:
                canvas_length = row_canvas.shape[1]
                first = starts - self.shift  # the window starts one early for a shifted-logits model
                width = self.block_length + self.shift if self.mode == CACHE_DUAL else canvas_length - int(first[0])
                window = first[:, None] + torch.arange(width, device=row_canvas.device)
                output = self.backbone(
                    take(row_canvas).gather(1, window),
                    take(row_mask),
                    logits_positions=(self.shift + self.offsets).expand(window.shape[0], -1),
                    cache=self.kv_cache.reuse(cache_rows, window),
                    window=window,
                )
            results.append((index, output))
        if len(results) == 1:
            output = results[0][1]
            return output.logits, output.hidden_states
        logits = results[0][1].logits.new_empty((num_rows, self.block_length, results[0][1].logits.shape[-1]))
        for index, output in results:
            logits[index] = output.logits
        return logits, None
