"""`RowCache`: a KV cache of fixed rows that requests take and give back (continuous batching).

What: per layer one key and one value tensor ``[max_rows, kv_heads, max_len, head_dim]``,
allocated on the first forward and never moved (captured CUDA graphs read and write them
at fixed addresses). A request owns one KV row for its life; its token at position p lives
at index p of that row, with no left padding.

Before each forward the caller says which rows the forward covers and where it writes
(`for_decode` / `for_prefill`); the attention layers' `update(key, value, layer_idx)` then
writes the new keys/values there and returns the slice of rows and key length the forward
attends over. The caller passes a 4D attention mask and explicit position ids, so the model
never asks the cache for lengths or offsets (transformers' `create_causal_mask` returns a
4D mask as given).

- decode: rows ``[0, B)`` (the lowest KV rows: `stepping` hands out the lowest free one),
  one new token per row written at the row's own position ``pos[b]`` (an ``index_put`` with
  a device tensor: the same kernel, whatever the positions, so it can be captured);
- prefill: ``[n, S]`` tokens of any n rows, each token at its own (row, position) (an
  ``index_put``), the rows' keys read back as a gathered copy (prefill is compute-bound);
- mixed (`for_mixed`): ``[B + n*S, 1]`` tokens, the first B a decode step over rows ``[0, B)``
  and the rest n prefill chunks of S tokens, each written at its own (row, position); `update`
  returns the whole store and `mixed_attention` reads each part's rows from it.

Concurrency: owned by the stepper's thread.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class _View:
    """Where the next forward writes and what it reads back."""

    length: int  # keys returned: [0, length)
    pos: torch.Tensor  # decode: [B] position written per row; prefill: [n, S] per row and token
    index: torch.Tensor  # decode, mixed: [B] 0..B-1 (rows [0, B)); prefill: [n] the KV rows, in batch order
    decode: bool
    chunk_rows: torch.Tensor | None = None  # mixed: [n] the chunks' KV rows
    chunk_pos: torch.Tensor | None = None  # mixed: [n, S] each chunk token's position


class _RowLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "RowCache") -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self._owner
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (o.max_rows + o.spare_rows, key_states.shape[1], o.max_len)
        self.keys = torch.zeros(*shape, key_states.shape[-1], dtype=self.dtype, device=self.device)
        self.values = torch.zeros(*shape, value_states.shape[-1], dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        v = self._owner.view
        if v is None:
            raise RuntimeError("RowCache used without for_decode/for_prefill")
        return _write(self.keys, key_states, v), _write(self.values, value_states, v)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        v = self._owner.view
        return (v.length if v is not None else self._owner.max_len), 0

    def get_seq_length(self) -> int:
        return 0  # rows differ; callers pass position ids and a 4D mask

    def get_max_length(self) -> int:
        return self._owner.max_len


def _write(store: torch.Tensor, new: torch.Tensor, v: _View) -> torch.Tensor:
    # mixed: new [B + n*S, heads, 1, dim]; both parts written, the whole store read. The chunks are
    # written second: a chunked row inside [0, B) runs as a dummy decode row writing at its next
    # position, which its chunk's first token then overwrites.
    if v.chunk_rows is not None:
        B = v.index.shape[0]
        n, S = v.chunk_pos.shape
        if B:
            store[:B][v.index, :, v.pos] = new[:B, :, 0]
        store[v.chunk_rows.view(-1, 1), :, v.chunk_pos] = new[B:, :, 0].view(n, S, new.shape[1], new.shape[-1])
        return store
    if v.decode:  # new [B, heads, 1, dim] -> row b at pos[b]; read back the slice of rows [0, B): no copy
        rows = store[: v.index.shape[0]]
        rows[v.index, :, v.pos] = new[:, :, 0]
        return rows[:, :, : v.length]
    # prefill: new [n, heads, S, dim] -> KV row index[i] at pos[i, j]; read back a gathered copy
    store[v.index.view(-1, 1), :, v.pos] = new.transpose(1, 2)
    return store[:, :, : v.length].index_select(0, v.index)


class RowCache(Cache):
    """``max_rows`` KV rows of ``max_len`` tokens each, for every layer of the model, plus
    `spare_rows` more that no request owns: a captured prefill's padding rows write there
    (`scratch_row`), so a graph's fixed row count never touches a live row."""

    def __init__(self, num_layers: int, max_rows: int, max_len: int, spare_rows: int = 0) -> None:
        self.max_rows = int(max_rows)
        self.max_len = int(max_len)
        self.spare_rows = int(spare_rows)
        self.view: _View | None = None
        self._arange: torch.Tensor | None = None  # [max_rows], made once (never inside a graph capture)
        super().__init__(layers=[_RowLayer(self) for _ in range(int(num_layers))])

    def for_decode(self, pos: torch.Tensor, length: int) -> None:
        """The next forward covers rows ``[0, len(pos))``, writes row b's token at ``pos[b]``,
        and attends over keys ``[0, length)``. `pos` is read when the forward *runs* (a
        captured graph keeps reading the same tensor)."""
        self.view = _View(length=int(length), pos=pos, index=self._first_rows(pos), decode=True)

    def for_prefill(self, rows: torch.Tensor, pos: torch.Tensor, length: int) -> None:
        """The next forward is ``[n, S]`` tokens: batch row i goes to KV row ``rows[i]``, its token j
        at position ``pos[i, j]``; it attends over keys ``[0, length)`` of those rows."""
        self.view = _View(length=int(length), pos=pos, index=rows, decode=False)

    def for_mixed(self, pos: torch.Tensor, chunk_rows: torch.Tensor, chunk_pos: torch.Tensor, length: int) -> None:
        """The next forward is ``[B + n*S, 1]`` tokens: a decode step over rows ``[0, B)`` (B =
        ``len(pos)``, row b's token at ``pos[b]``; B may be 0), then n chunks of S tokens, chunk i's
        token j written to KV row ``chunk_rows[i]`` at ``chunk_pos[i, j]``; both attend over keys
        ``[0, length)`` (`mixed_attention` splits them)."""
        self.view = _View(length=int(length), pos=pos, index=self._first_rows(pos), decode=True,
                          chunk_rows=chunk_rows, chunk_pos=chunk_pos)

    def _first_rows(self, pos: torch.Tensor) -> torch.Tensor:
        """KV rows ``[0, len(pos))`` as a device tensor (a view of one made once, never inside a capture)."""
        if self._arange is None or self._arange.device != pos.device:
            self._arange = torch.arange(self.max_rows, device=pos.device)
        return self._arange[: int(pos.shape[0])]

    @property
    def scratch_row(self) -> int:
        """The first spare KV row (needs ``spare_rows >= 1``): written by padding rows, never read."""
        if not self.spare_rows:
            raise RuntimeError("this RowCache has no spare row")
        return self.max_rows

    def move_row(self, src: int, dst: int, tokens: int) -> None:
        """Copy KV row `src`'s first `tokens` keys and values into KV row `dst`, every layer (the
        stepper moves a row down into a free one; `src` is then free and its contents unread)."""
        if tokens <= 0:
            return
        for lay in self.layers:
            if lay.is_initialized:
                lay.keys[dst, :, :tokens].copy_(lay.keys[src, :, :tokens])
                lay.values[dst, :, :tokens].copy_(lay.values[src, :, :tokens])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lay in self.layers if lay.is_initialized
                   for t in (lay.keys, lay.values))
