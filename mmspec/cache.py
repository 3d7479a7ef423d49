"""Static, preallocated key/value cache shared by every target and drafter in mmspec.

Why static: CUDA graphs and ``torch.compile(mode="reduce-overhead")`` need fixed shapes, and
rollback after a rejected draft must be free. Each logical row ``b`` has a committed length
``lengths[b]``; keys at slots ``>= lengths[b]`` are invisible (masked), so *rollback is moving a
length* and stale entries of rejected drafts are simply overwritten by the next write.

Classifier-free guidance keeps ``groups = 2`` physical rows per logical row, laid out as
``[cond rows ; uncond rows]`` (LlamaGen's convention). Both halves share ``lengths``: they are
committed, rolled back and compacted together, so they can never drift apart.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """K/V buffers ``[L, G*B, H_kv, S, D]`` plus per-row committed lengths ``[B]``.

    Args:
        num_layers: number of attention layers ``L``.
        batch_size: logical batch ``B`` (conditions, not CFG-doubled rows).
        num_kv_heads: key/value heads ``H_kv``.
        max_seq_len: capacity ``S`` in tokens (prompt + generated + one draft window).
        head_dim: per-head width ``D``.
        dtype: storage dtype of keys and values.
        device: where the buffers live.
        groups: physical rows per logical row (2 for a CFG ``[cond ; uncond]`` pair).
        key_bucket: 0 (default): attention always reads all ``S`` slots. ``n > 0``: a loop may bound
            the keys attention reads (:meth:`limit_keys`) to the filled part rounded up to a
            multiple of ``n`` (sized for targets whose caches can be much longer than what is filled,
            e.g. a language model asked for many new tokens; a compiled target keeps 0: one shape).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        groups: int = 1,
        key_bucket: int = 0,
    ) -> None:
        if min(num_layers, batch_size, num_kv_heads, max_seq_len, head_dim, groups) < 1:
            raise ValueError(
                "StaticKVCache sizes must all be >= 1, got "
                f"num_layers={num_layers}, batch_size={batch_size}, num_kv_heads={num_kv_heads}, "
                f"max_seq_len={max_seq_len}, head_dim={head_dim}, groups={groups}"
            )
        shape = (num_layers, groups * batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        # Keys that stay invisible to every other query (left-padded captions / prompts).
        self.blocked = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)  # [B, S]
        self.groups = groups
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        if key_bucket < 0:
            raise ValueError(f"key_bucket must be >= 0 (0: attend to every slot), got {key_bucket}")
        self.key_bucket = key_bucket
        self.key_limit: int | None = None  # host-side bound on the slots attention reads (None: all)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def key_len(self) -> int:
        """How many slots attention reads: ``max_seq_len``, or the bound set by :meth:`limit_keys`."""
        return self.max_seq_len if self.key_limit is None else self.key_limit

    @property
    def bounds_keys(self) -> bool:
        """Whether :meth:`limit_keys` can make attention read fewer slots than the whole buffer."""
        return 0 < self.key_bucket < self.max_seq_len

    def limit_keys(self, needed: int | None) -> None:
        """Let attention read only the first ``needed`` slots, rounded up to a multiple of
        ``key_bucket`` (few distinct shapes); None, or a cache with ``key_bucket == 0``: every slot.

        ``needed`` must cover every row's committed keys and the slots the next forward writes
        (``max(lengths) + T``): keys beyond it are never attended, so the results are those of the
        whole buffer (its extra slots are masked out), at the cost of the filled part only."""
        if needed is None or not self.key_bucket:
            self.key_limit = None
            return
        self.key_limit = min(self.max_seq_len, -(-needed // self.key_bucket) * self.key_bucket)

    # ------------------------------------------------------------------ slots and masks
    def slots(self, num_new: int) -> torch.Tensor:
        """Slots ``[B, T]`` where ``num_new`` new tokens of each row will be written."""
        return self.lengths[:, None] + torch.arange(num_new, device=self.device)

    def attention_mask(self, slots: torch.Tensor, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask ``[G*B, 1, T, S']`` (True = may attend) for queries written at ``slots``,
        over the ``S' = key_len`` slots attention reads.

        Args:
            slots: ``[B, T]`` cache slots of the new tokens (from :meth:`slots`).
            tree_mask: ``[B, T, T]`` or ``[T, T]`` bool, ``tree_mask[t, u]`` = new token ``t`` may
                see new token ``u`` (ancestor-or-self for a draft tree). ``None`` = causal.

        Every query sees all committed, unblocked keys of its row plus the new keys its tree mask
        allows; a blocked new key is seen only by itself (LlamaGen's padded-caption convention:
        a padded position attends to itself so its softmax is defined, nobody attends to it).
        """
        batch, num_new = slots.shape
        key_slots = torch.arange(self.key_len, device=self.device)
        blocked = self.blocked[:, : self.key_len]  # [B, S']
        if tree_mask is None:
            # Causal: a query at slot s sees every key at a slot <= s (committed keys and the earlier
            # new ones, written at lengths + 0 .. T-1) that is unblocked or is its own: the general
            # construction below in 5 ops instead of 12, the common case of every decode and chain step.
            mask = (key_slots <= slots[..., None]) & (~blocked[:, None, :] | (key_slots == slots[..., None]))
            return (mask.repeat(self.groups, 1, 1) if self.groups > 1 else mask)[:, None]
        committed = (key_slots[None, :] < self.lengths[:, None]) & ~blocked
        mask = committed[:, None, :].expand(batch, num_new, -1).clone()
        eye = torch.eye(num_new, dtype=torch.bool, device=self.device)
        new_blocked = self.blocked.gather(1, slots.clamp(max=self.max_seq_len - 1))  # [B, T]
        tree_mask = tree_mask.to(torch.bool).expand(batch, num_new, num_new) & (~new_blocked[:, None, :] | eye)
        mask.scatter_(2, slots[:, None, :].expand(batch, num_new, num_new), tree_mask)
        return mask.repeat(self.groups, 1, 1)[:, None]

    def block_keys(self, blocked: torch.Tensor) -> None:
        """Mark the first ``blocked.shape[1]`` slots of each row as never attendable (``[B, P]`` bool)."""
        self.blocked[:, : blocked.shape[1]] = blocked.to(torch.bool)

    # ------------------------------------------------------------------ writes
    def write(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values of one layer at ``slots`` and return the layer's K, V as attention reads them.

        Args:
            layer: layer index.
            k_new, v_new: ``[G*B, H_kv, T, D]`` new keys / values.
            slots: ``[B, T]`` per-row slots (each row writes at its own length: ragged batches).

        Returns:
            ``(k, v)`` views ``[G*B, H_kv, S', D]`` of this layer's first ``S' = key_len`` slots.
        """
        rows, heads, num_new, dim = k_new.shape
        # Both CFG halves write at the same slots: scatter through a [G, B, ...] view of the buffers
        # with the index broadcast over the groups (no repeated copy of the slots per layer).
        grouped = (self.groups, rows // self.groups, heads)
        index = slots[None, :, None, :, None].expand(*grouped, num_new, dim)
        keys, values = self.k[layer], self.v[layer]
        keys.view(*grouped, *keys.shape[2:]).scatter_(3, index, k_new.to(keys.dtype).view(*grouped, num_new, dim))
        values.view(*grouped, *values.shape[2:]).scatter_(3, index, v_new.to(values.dtype).view(*grouped, num_new, dim))
        if self.key_limit is not None:
            return keys[:, :, : self.key_limit], values[:, :, : self.key_limit]
        return keys, values

    # ------------------------------------------------------------------ commit / rollback
    def commit(self, num_new: torch.Tensor) -> None:
        """Make the first ``num_new[b]`` written tokens of each row permanent. ``num_new``: ``[B]``."""
        self.lengths += num_new

    def rollback(self, lengths: torch.Tensor) -> None:
        """Set every row's committed length (``[B]``); later slots become invisible."""
        self.lengths.copy_(lengths)

    def compact(self, src_offsets: torch.Tensor, num_new: torch.Tensor) -> None:
        """Commit an accepted tree path: move its K/V to contiguous slots after ``lengths``.

        Args:
            src_offsets: ``[B, P]`` offsets (relative to ``lengths``) of the path's nodes in the
                order they join the sequence; entries beyond ``num_new[b]`` are ignored.
            num_new: ``[B]`` number of path entries to commit per row.

        The gather reads every source before any write, so overlapping moves are safe.
        """
        num_path = src_offsets.shape[1]
        valid = torch.arange(num_path, device=self.device)[None, :] < num_new[:, None]  # [B, P]
        dst = self.lengths[:, None] + torch.arange(num_path, device=self.device)
        # Invalid entries copy a slot onto itself: harmless, and keeps the shapes static.
        src = torch.where(valid, self.lengths[:, None] + src_offsets.clamp(min=0), dst)
        src = src.clamp(max=self.max_seq_len - 1).repeat(self.groups, 1)
        dst = dst.clamp(max=self.max_seq_len - 1).repeat(self.groups, 1)
        layers, rows, heads, _, dim = self.k.shape
        src_index = src[None, :, None, :, None].expand(layers, rows, heads, num_path, dim)
        dst_index = dst[None, :, None, :, None].expand(layers, rows, heads, num_path, dim)
        for buf in (self.k, self.v):
            buf.scatter_(3, dst_index, buf.gather(3, src_index))
        self.lengths += num_new

    def reset(self) -> None:
        """Forget every row (lengths to zero, no blocked keys, attention over every slot again);
        buffers are reused, not freed."""
        self.lengths.zero_()
        self.blocked.zero_()
        self.key_limit = None
