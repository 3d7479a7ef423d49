"""Triton kernels for speculative decoding, each beside its PyTorch reference and a
dispatcher (Triton on CUDA inputs, the reference elsewhere; ``MMSPEC_DISABLE_TRITON=1``
forces the reference). triton is optional: without it only the references run."""

from .rejection import (
    HAS_TRITON,
    chain_rejection_sample,
    chain_rejection_sample_ref,
    chain_rejection_sample_triton,
    tree_rejection_sample,
    tree_rejection_sample_ref,
    tree_rejection_sample_triton,
    tree_walk_ref,
    TreeWalk,
)

__all__ = [
    "HAS_TRITON",
    "chain_rejection_sample",
    "chain_rejection_sample_ref",
    "chain_rejection_sample_triton",
    "tree_rejection_sample",
    "tree_rejection_sample_ref",
    "tree_rejection_sample_triton",
    "tree_walk_ref",
    "TreeWalk",
]

from .neighbourhood import (  # noqa: E402  (LANTERN / GSD relaxed-acceptance masses)
    gsd_group_mass,
    gsd_group_mass_ref,
    gsd_group_mass_triton,
    lantern_neighbour_mass,
    lantern_neighbour_mass_ref,
    lantern_neighbour_mass_triton,
)

__all__ += [
    "gsd_group_mass",
    "gsd_group_mass_ref",
    "gsd_group_mass_triton",
    "lantern_neighbour_mass",
    "lantern_neighbour_mass_ref",
    "lantern_neighbour_mass_triton",
]
