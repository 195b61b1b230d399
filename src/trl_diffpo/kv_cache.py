"""Keys/values of every canvas position, for cached block decoding of bidirectional masked diffusion LMs.

Semi-autoregressive decoding fills one block at a time. Fast-dLLM's observation: between two steps of a block the
keys/values of the positions outside the block barely change, so they can be computed once at the block start and
reused. :class:`CanvasKVCache` holds, per layer, the keys and values of **every canvas position** of every row, as
computed by the row's last full forward (``(batch, kv_heads, canvas_len, head_dim)``, slot ``j`` = canvas position
``j``, RoPE already applied). Because attention is bidirectional, the order of the keys does not matter; a forward of
a *window* of positions (the current block, or the block and everything after it) writes its fresh keys/values into
the window's slots and attends to all slots: fresh inside the window, cached outside. The stale slots of the window
are overwritten before they are read, so writing into the stored tensors is harmless.

The protocol is transformers' ``cache.update(key, value, layer_idx)`` (called by every attention layer after RoPE),
so the same object serves the native LLaDA / Dream classes and transformers' Llama / Qwen2 / Qwen3 attention.
"""

from __future__ import annotations

import torch


class CanvasKVCache:
    """Per-layer keys/values of the whole canvas for ``batch_size`` rows (see the module docstring).

    Before each forward, :meth:`record` (a full forward: store its keys/values) or :meth:`reuse` (a window forward:
    write the window's keys/values, attend to the whole canvas) says what ``update`` does.

    Attributes:
        rows: ``(rows,)`` the batch rows the current forward carries (``None``: all ``batch_size`` rows, in order).
        window: ``(rows, window_len)`` canvas positions of the current forward's inputs (``None``: the full canvas).
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.rows: torch.Tensor | None = None
        self.window: torch.Tensor | None = None

    def record(self, rows: torch.Tensor | None) -> CanvasKVCache:
        """The next forward runs on the full canvas of ``rows``: store its keys/values."""
        self.rows, self.window = rows, None
        return self

    def reuse(self, rows: torch.Tensor | None, window: torch.Tensor) -> CanvasKVCache:
        """The next forward runs on the ``(rows, window_len)`` canvas positions ``window`` of ``rows``."""
        self.rows, self.window = rows, window
        return self

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by attention layer ``layer_idx`` with its ``(rows, kv_heads, len, head_dim)`` keys/values after
        RoPE; returns the keys/values to attend to."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.window is None:
            self.keys[layer_idx] = self._store(self.keys[layer_idx], key)
            self.values[layer_idx] = self._store(self.values[layer_idx], value)
            return key, value
        if self.keys[layer_idx] is None:
            raise RuntimeError("CanvasKVCache: a window forward before any full forward recorded the canvas.")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.rows is not None:  # a copy: the other rows' slots stay as they are
            keys, values = keys[self.rows], values[self.rows]
        index = self.window[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
        return keys.scatter_(2, index, key), values.scatter_(2, index, value)

    def _store(self, stored: torch.Tensor | None, fresh: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return fresh
        if stored is None:
            stored = fresh.new_zeros((self.batch_size, *fresh.shape[1:]))
        stored[self.rows] = fresh
        return stored

    @property
    def canvas_length(self) -> int | None:
        """Canvas length of the stored keys/values (``None`` before the first full forward)."""
        return self.keys[0].shape[2] if self.keys and self.keys[0] is not None else None

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` stored for layer ``layer_idx``, ``(batch, kv_heads, canvas_len, head_dim)``."""
        return self.keys[layer_idx], self.values[layer_idx]
