"""Draft trees: one batch of token trees, each given by its parent pointers.

Node 0 of every row is the root, i.e. the last committed token; draft nodes are 1..N-1 and every
parent index is smaller than its child's (topological order). Trees may differ per row (dynamic,
EAGLE-2 style) but share ``N`` so tensors stay static. Padding nodes can be expressed as extra
leaves whose proposals a rule will reject (or not test, when listed after a sibling that is
accepted); nothing in the tree needs a host sync once built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """Structure of a batch of draft trees.

    ``parents``: ``[B, N]`` int64, ``parents[:, 0] = -1``. ``depth``: ``[B, N]`` (root 0).
    ``ancestor_mask``: ``[B, N, N]`` bool, node i may attend to node j iff j is i or an ancestor.
    ``children``: ``[B, N, C]`` children in testing order (-1 padded). ``max_depth`` and
    ``max_children`` are Python ints fixed at construction (no sync in the hot loop).
    """

    parents: torch.Tensor
    depth: torch.Tensor
    ancestor_mask: torch.Tensor
    children: torch.Tensor
    max_depth: int
    max_children: int

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[1]

    @classmethod
    def from_parents(cls, parents: torch.Tensor | list[int] | list[list[int]]) -> DraftTree:
        """Build masks, depths and the children table from parent pointers ``[B, N]`` or ``[N]``.

        Siblings are tested in increasing node index, so a drafter lists its most likely child
        first. Host syncs here are deliberate: trees are built once per draft, outside the verify
        step, and static trees are built once per run.
        """
        parents = torch.as_tensor(parents, dtype=torch.long)
        if parents.dim() == 1:
            parents = parents[None]
        batch, num_nodes = parents.shape
        if num_nodes < 1 or bool((parents[:, 0] != -1).any()):
            raise ValueError("node 0 must be the root of every tree (parents[:, 0] == -1)")
        idx = torch.arange(num_nodes, device=parents.device)
        if num_nodes > 1 and bool(((parents[:, 1:] < 0) | (parents[:, 1:] >= idx[1:])).any()):
            raise ValueError("every non-root node needs a parent with a smaller index (topological order)")
        ancestor = torch.eye(num_nodes, dtype=torch.bool, device=parents.device).repeat(batch, 1, 1)
        depth = torch.zeros(batch, num_nodes, dtype=torch.long, device=parents.device)
        for n in range(1, num_nodes):  # parents precede children, so their rows are complete
            p = parents[:, n]
            ancestor[:, n] |= ancestor[torch.arange(batch), p]
            depth[:, n] = depth[torch.arange(batch), p] + 1
        counts = torch.zeros(batch, num_nodes, dtype=torch.long, device=parents.device)
        if num_nodes > 1:
            counts.scatter_add_(1, parents[:, 1:], torch.ones_like(parents[:, 1:]))
        max_children = max(int(counts.max()), 1)
        children = torch.full((batch, num_nodes, max_children), -1, dtype=torch.long, device=parents.device)
        fill = torch.zeros(batch, num_nodes, dtype=torch.long, device=parents.device)
        rows = torch.arange(batch, device=parents.device)
        for n in range(1, num_nodes):
            p = parents[:, n]
            children[rows, p, fill[rows, p]] = n
            fill[rows, p] += 1
        return cls(parents, depth, ancestor, children, int(depth.max()), max_children)

    @classmethod
    def chain(cls, num_draft_tokens: int, batch_size: int = 1) -> DraftTree:
        """A chain of ``num_draft_tokens`` drafts as a tree (node i's parent is i - 1)."""
        parents = torch.arange(-1, num_draft_tokens, dtype=torch.long)
        return cls.from_parents(parents[None].expand(batch_size, -1).contiguous())

    def to(self, device: torch.device | str) -> DraftTree:
        return DraftTree(
            self.parents.to(device),
            self.depth.to(device),
            self.ancestor_mask.to(device),
            self.children.to(device),
            self.max_depth,
            self.max_children,
        )

    def positions(self, base: torch.Tensor) -> torch.Tensor:
        """Sequence positions ``[B, N]`` of the nodes given the root's positions ``base [B]``."""
        return base[:, None] + self.depth

    def path_offsets(self, accepted_nodes: torch.Tensor) -> torch.Tensor:
        """``[B, D + 1]`` node indices of the root followed by the accepted path (-1 padded),
        i.e. the tokens that join the sequence, in order (used to compact the KV cache)."""
        root = accepted_nodes.new_zeros(accepted_nodes.shape[0], 1)  # D = 0 (root-only tree) has no column to slice
        return torch.cat([root, accepted_nodes], dim=1)
