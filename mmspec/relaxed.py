"""Relaxed (lossy) acceptance for AR image models: LANTERN / LANTERN++ and GSD.

Visual AR models spread probability thinly over many interchangeable tokens, so exact speculative
sampling rejects most drafts. Both rules here keep the structure of exact speculative sampling
(Leviathan et al. 2023, Alg. 1) but, for each draft token ``x``, verify against a *relaxed target*
``p~_x`` instead of the target ``p``:

* **LANTERN** (Jang et al. 2024, arXiv 2410.03355; relaxed acceptance over the latent proximity set
  ``A_{k,delta}(x)``): the target mass ``S`` of ``x``'s
  nearest latent neighbours (in the VQ codebook) is moved onto ``x``, up to ``S <= delta``
  (total-variation budget) or, in LANTERN++ (Park et al. 2025, arXiv 2502.06352, multiplicative relaxation),
  ``S <= (lambda - 1) p(x)``.
* **GSD** (So et al. 2025, arXiv 2508.07747, dynamic GSD): accept with ``min(1, sum_G p / sum_G q)``
  over a dynamic group ``G`` of tokens around ``x`` — exact sampling against a target in which
  ``x`` absorbs just enough of its group's mass to reach that ratio.

Draft ``x`` (drawn from ``q``) is accepted with ``min(1, p~_x(x) / q(x))``; at a rejection the
recovered token comes from ``norm(max(0, p~_x - q))``; after a fully accepted chain the bonus token
comes from ``p`` itself (there is no draft token to relax around). With a deterministic draft
(``q`` one-hot at ``x``) the committed token is then distributed *exactly* as ``p~_x``, so its
distance to ``p`` is ``TVD(p~_x, p)``, which :class:`~mmspec.types.Verdict` reports per committed
position in ``moved_mass``. For stochastic drafts several draft tokens may claim the same mass and
the marginal of a committed token can move further than any single ``p~_x``: what holds in
general is ``TVD(law, p) <= P(accept) - P_exact(accept)`` at that position (proved in the
:class:`RelaxedAcceptance` docstring and tested).

Both rules are registered (``get_acceptance_rule("lantern", neighbours=...)``,
``get_acceptance_rule("gsd", embeddings=...)``) when this module is imported. Both also take
``variant="official"``: the authors' code reproduced (:mod:`mmspec.relaxed_official`), lossy with no
bound; ``docs/relaxed_rules.md`` lists every difference from the defaults here and its measured effect.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from .acceptance import AcceptanceRule, register_acceptance_rule
from .kernels.neighbourhood import gsd_group_mass, lantern_neighbour_mass
from .kernels.rejection import chain_rejection_sample, tree_walk_ref
from .relaxed_official import (
    LANTERN_PATHS,
    verify_gsd_official,
    verify_lantern_official,
    verify_lantern_official_greedy,
)
from .sampling import SamplingConfig
from .types import Distribution, Draft, Verdict

__all__ = [
    "GSDAcceptance",
    "LanternAcceptance",
    "RelaxedAcceptance",
    "build_latent_neighbours",
    "codebook_digest",
    "gsd_candidates",
    "load_or_build_neighbours",
]

#: ``variant`` option of the relaxed rules: mmspec's bounded rules (default) or the authors' code
#: reproduced (:mod:`mmspec.relaxed_official`; no bound).
VARIANTS = ("mmspec", "official")

#: Distances computed at once while building a neighbour table (rows x V), ~128 MB in float64.
_DISTANCES_PER_CHUNK = 1 << 24
_CACHE_FORMAT = 2  # 2: the row choice ("raw" / "normalised") is part of the key
_BUILD_HINT = "build it with mmspec.relaxed.load_or_build_neighbours(vq.codebook_embeddings(), k, path)"


# --------------------------------------------------------------------------------------------
# Latent neighbours (LANTERN)
# --------------------------------------------------------------------------------------------


def build_latent_neighbours(
    codebook: torch.Tensor, k: int, chunk_size: int | None = None, normalize: bool = False
) -> torch.Tensor:
    """The ``k`` nearest codebook rows of every token by Euclidean distance, nearest first, the
    token itself excluded (LANTERN's latent proximity: the candidates of ``A_{k,delta}(x)``).

    Args:
        codebook: ``[V, C]`` code vectors. mmspec's default uses them exactly as the decoder sees them
            (``LlamaGenVQ.codebook_embeddings()``: L2-normalised for LlamaGen's cosine codebook); the
            official LANTERN code (``entrypoints/generate_codebook.py``: ``torch.cdist`` of
            ``vq_model.quantize.embedding.weight``) uses the raw stored rows.
        k: neighbours per token, ``1 <= k <= V - 1``.
        chunk_size: rows per distance block; by default ``2**24 / V`` rows, so a ``V x V`` matrix is
            never materialised (16384 codes: 1024-row blocks of 128 MB in float64).
        normalize: L2-normalise the rows first (``F.normalize``, as LlamaGen's quantiser does).

    Returns ``[V, k]`` int32 (``V = 16384, k = 1000``: 64 MB). Distances are computed in float64
    (float32 on MPS) from ``|a|^2 + |b|^2 - 2 a.b``; exact ties are ordered arbitrarily.
    """
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape [V, C], got {list(codebook.shape)}")
    vocab = codebook.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab - 1:
        raise ValueError(
            f"k must be an int in [1, {vocab - 1}] (codebook size - 1) for a codebook of {vocab} codes, got {k!r}"
        )
    dtype = torch.float32 if codebook.device.type == "mps" else torch.float64
    rows = F.normalize(codebook.detach().float(), p=2, dim=-1) if normalize else codebook.detach()
    emb = rows.to(dtype)
    norms = (emb * emb).sum(-1)  # [V]
    chunk = chunk_size or max(1, _DISTANCES_PER_CHUNK // vocab)
    table = torch.empty(vocab, k, dtype=torch.int32, device=codebook.device)
    for start in range(0, vocab, chunk):
        block = emb[start : start + chunk]  # [c, C]
        rows = torch.arange(block.shape[0], device=emb.device)
        dist = norms[start : start + chunk, None] + norms[None] - 2 * block @ emb.T  # [c, V]
        dist[rows, rows + start] = float("inf")  # a token is not its own neighbour
        table[start : start + chunk] = dist.topk(k, dim=1, largest=False, sorted=True).indices.int()
    return table


def codebook_digest(codebook: torch.Tensor) -> str:
    """SHA-256 of a codebook's shape and float32 values (the neighbour cache's key)."""
    values = codebook.detach().float().cpu().contiguous()
    digest = hashlib.sha256(str(list(values.shape)).encode())
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def _cache_file(cache_path: str | os.PathLike, k: int, digest: str, rows: str) -> Path:
    path = Path(cache_path)
    if path.is_dir() or (not path.exists() and path.suffix == ""):
        return path / f"lantern_neighbours_k{k}_{rows}_{digest[:16]}.pt"
    return path


def _read_cache(path: Path, k: int, digest: str, vocab: int, rows: str) -> torch.Tensor:
    """The table stored at ``path``; ValueError if it is not the one for this codebook and k."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT:
        raise ValueError("not a LANTERN neighbour cache")
    if blob.get("codebook_sha256") != digest:
        raise ValueError("it was built for a different codebook")
    if blob.get("k") != k:
        raise ValueError(f"it holds k={blob.get('k')} neighbours, k={k} was asked for")
    if blob.get("rows") != rows:
        raise ValueError(f"it was built from {blob.get('rows')} codebook rows, {rows} rows were asked for")
    table = blob.get("neighbours")
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != (vocab, k) or table.dtype != torch.int32:
        raise ValueError("its table has the wrong shape or dtype")
    return table


def load_or_build_neighbours(
    codebook: torch.Tensor, k: int, cache_path: str | os.PathLike, normalize: bool = False
) -> torch.Tensor:
    """:func:`build_latent_neighbours` (``normalize``: from L2-normalised rows), cached on disk next to
    the model.

    ``cache_path`` is a folder (the file is named after ``k``, the row choice — ``raw`` or
    ``normalised`` — and the codebook's hash, so several tables can live side by side) or a ``.pt``
    file. A file that cannot be read, or that was built
    for another codebook or another ``k``, is rebuilt with a warning. Writes are atomic (temporary
    file + rename). Returns ``[V, k]`` int32 on the codebook's device.
    """
    vocab = codebook.shape[0]
    digest = codebook_digest(codebook)
    rows = "normalised" if normalize else "raw"
    path = _cache_file(cache_path, k, digest, rows)
    if path.is_file():
        try:
            return _read_cache(path, k, digest, vocab, rows).to(codebook.device)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
            warnings.warn(f"LANTERN neighbour cache {path} is unusable ({err}); rebuilding it", stacklevel=2)
    table = build_latent_neighbours(codebook, k, normalize=normalize)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(
        {"format": _CACHE_FORMAT, "k": k, "rows": rows, "codebook_sha256": digest, "neighbours": table.cpu()}, tmp
    )
    os.replace(tmp, path)
    return table


# --------------------------------------------------------------------------------------------
# Dynamic groups (GSD)
# --------------------------------------------------------------------------------------------


def gsd_candidates(probs: torch.Tensor, tokens: torch.Tensor, group_size: int) -> torch.Tensor:
    """GSD's candidate window (So et al. 2025, dynamic clustering; the reference code's ``logit_sort`` window):
    the ``group_size`` tokens around the draft token in the target's probability ranking.

    Tokens are ranked by decreasing ``probs`` (ties by increasing id, stable); the window spans
    ranks ``r(x) - (G - 1) // 2 .. r(x) + G // 2`` (``G = 14``: the 6 tokens ranked just above
    ``x``, ``x``, the 7 just below, the reference code's window away from the ends of the ranking).
    Ranks outside the vocabulary give -1: the window is truncated at both ends. The reference code's
    Python slice instead wraps for the 7 lowest-ranked tokens and comes out empty (plain ``p/q``
    there); :func:`mmspec.relaxed_official.gsd_official_window` reproduces that
    (``variant="official"``, ``docs/relaxed_rules.md``).

    Args: ``probs [R, V]``, ``tokens [R]``, ``group_size`` G >= 1. Returns ``[R, G]`` int64.
    """
    tokens = tokens.long()
    if group_size == 1:  # the window is the draft token alone: no ranking needed
        return tokens[:, None]
    vocab = probs.shape[-1]
    order = probs.argsort(dim=-1, descending=True, stable=True)  # [R, V] ids by rank
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(vocab, device=order.device).expand_as(order))
    offsets = torch.arange(group_size, device=order.device) - (group_size - 1) // 2  # [G]
    window = ranks.gather(1, tokens[:, None]) + offsets  # [R, G] ranks
    inside = (window >= 0) & (window < vocab)
    return torch.where(inside, order.gather(1, window.clamp(0, vocab - 1)), -1)


# --------------------------------------------------------------------------------------------
# The shared verify: exact speculative sampling against a relaxed target
# --------------------------------------------------------------------------------------------


class RelaxedAcceptance(AcceptanceRule):
    """Exact speculative sampling against a per-draft-token relaxed target ``p~_x``.

    Subclasses define :meth:`relaxed_target`, which must only move mass *onto* the draft token:
    ``p~_x(x) >= p(x)`` and ``p~_x <= p`` elsewhere (so acceptance is never below exact
    acceptance, draft by draft under the same random draws). Chains: draft ``i`` (token ``x``) is
    accepted iff ``u_i q(x) < p~_x(x)`` with ``p~_x`` built from ``target_probs[:, i]``; the first
    rejection resamples from ``norm(max(0, p~_x - q))``; a fully accepted chain takes its bonus
    token from ``p = target_probs[:, k]``. Trees: the sibling-recursive scheme of
    :class:`~mmspec.acceptance.ExactAcceptance` (SpecInfer), each sibling tested against the
    relaxed version of the working (residual) distribution and the residual taken from it. The
    random draws are those of ``ExactAcceptance`` (``rand(B, num_nodes)`` then ``rand(B)``), so
    where ``p~_x == p`` the verdicts are identical token for token.

    Guarantee. Given a deterministic draft ``x`` (``q`` one-hot) the committed token is distributed
    exactly as ``p~_x``: accepted with ``p~_x(x)``, else drawn from ``p~_x`` without ``x``. For a
    stochastic draft the committed token's law ``O`` satisfies
    ``TVD(O, p) <= sum_y [min(q(y), p~_y(y)) - min(q(y), p(y))]``, the acceptance probability
    gained over exact sampling (it can exceed every single ``TVD(p~_x, p)``: several drafts may
    claim the same mass). Proof: where ``q(y) > p(y)`` every residual ``max(0, p~_x - q)``
    vanishes at ``y``, so ``O(y) = min(q(y), p~_y(y))``, at most the gain above ``p(y)``; where
    ``q(y) <= p(y)`` a rejection of ``x`` (mass ``rho_x``, residual mass ``Z_x``) adds
    ``rho_x / Z_x * (p~_x(y) - q(y))`` with ``rho_x <= rho0_x`` and ``Z_x >= Z0 - rho0_x + rho_x``
    (``p~_x <= p`` off ``x``; 0 marks exact sampling), so ``sum_x rho_x / Z_x <= 1`` and
    ``O(y) <= p(y)``. Trees: ``moved_mass`` reports, per committed position, the sum of
    ``TVD(p~, p)`` over the siblings tested there; with deterministic drafts the committed token's
    law is within that sum of the target (each sibling test is an exact step on a relaxed target).
    """

    lossless: ClassVar[bool] = False

    @abstractmethod
    def relaxed_target(
        self, probs: torch.Tensor, tokens: torch.Tensor, draft_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p~ [R, V] float32, moved [R] float32 = TVD(p~, p))`` for target rows ``probs [R, V]``,
        draft tokens ``tokens [R]`` and their proposals ``draft_probs [R, V]`` (None: one-hot).
        Must return ``p`` bit for bit where nothing is moved."""

    @abstractmethod
    def check_vocab(self, vocab_size: int) -> None:
        """Raise a ValueError (saying how to fix it) if the rule's tables do not fit ``vocab_size``."""

    def verify(self, draft: Draft, target: Distribution | None, generator: torch.Generator | None) -> Verdict:
        target_probs = self._probs(target)
        batch, num_nodes = draft.tokens.shape
        device = target_probs.device
        self.check_vocab(target_probs.shape[-1])
        uniform_accept = torch.rand(batch, num_nodes, generator=generator, device=device)
        uniform_sample = torch.rand(batch, generator=generator, device=device)
        if draft.tree is None:
            return self._verify_chain(draft, target_probs.float(), uniform_accept, uniform_sample)
        return self._verify_tree(draft, target_probs.float(), uniform_accept, uniform_sample)

    def _verify_chain(
        self, draft: Draft, target: torch.Tensor, uniform_accept: torch.Tensor, uniform_sample: torch.Tensor
    ) -> Verdict:
        batch, k = draft.tokens.shape
        vocab = target.shape[-1]
        q = draft.draft_probs
        relaxed, moved = self.relaxed_target(
            target[:, :k].reshape(batch * k, vocab),
            draft.tokens.reshape(batch * k),
            None if q is None else q.reshape(batch * k, vocab),
        )
        # [B, k+1, V]: relaxed targets for the drafts, the plain target for the bonus position
        relaxed = torch.cat([relaxed.view(batch, k, vocab), target[:, k:]], dim=1)
        num_accepted, tokens = chain_rejection_sample(draft.tokens, q, relaxed, uniform_accept, uniform_sample)
        committed = torch.arange(k, device=target.device)[None] <= num_accepted[:, None]  # [B, k]
        moved_mass = F.pad(torch.where(committed, moved.view(batch, k), 0.0), (0, 1))  # bonus: 0
        return Verdict(num_accepted, tokens, is_bonus=num_accepted == k, moved_mass=moved_mass)

    def _verify_tree(
        self, draft: Draft, target: torch.Tensor, uniform_accept: torch.Tensor, uniform_sample: torch.Tensor
    ) -> Verdict:
        """Recursive rejection sampling over siblings (the exact tree walk) with each tested node's
        target replaced by its relaxed target."""
        tree = draft.tree
        batch = draft.tokens.shape[0]
        draft_probs = None if draft.draft_probs is None else draft.draft_probs.float()
        walk = tree_walk_ref(
            draft.tokens, tree.children, draft_probs, target, uniform_accept, tree.max_depth, relax=self.relaxed_target
        )
        # The recovered or bonus token: a chain of zero drafts samples its bonus from the residual
        # with the shared inverse-CDF rule (Triton on CUDA), exactly as the tree kernel's final draw.
        _, final = chain_rejection_sample(
            draft.tokens[:, :0], None, walk.residual[:, None], uniform_accept[:, :0], uniform_sample
        )
        walk.tokens.scatter_(1, walk.num_accepted[:, None], final)
        is_bonus = tree.children[torch.arange(batch, device=target.device), walk.node, 0] < 0  # stopped at a leaf
        return Verdict(
            walk.num_accepted, walk.tokens, is_bonus, accepted_nodes=walk.accepted_nodes, moved_mass=walk.moved_mass
        )


def _device_copy(cache: dict, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, copied once per device (a one-off transfer, not per step)."""
    key = str(device)
    if key not in cache:
        cache[key] = tensor.to(device)
    return cache[key]


# --------------------------------------------------------------------------------------------
# LANTERN / LANTERN++
# --------------------------------------------------------------------------------------------


@register_acceptance_rule
class LanternAcceptance(RelaxedAcceptance):
    """LANTERN relaxed acceptance (Jang et al. 2024, arXiv 2410.03355) and LANTERN++'s
    multiplicative variant (Park et al. 2025, arXiv 2502.06352).

    For draft token ``x`` with latent neighbours ``n_1 .. n_k`` (nearest codebook rows first,
    :func:`build_latent_neighbours`), ``S`` is the largest prefix sum ``p(n_1) + .. + p(n_j)``
    with ``S <= delta`` (``mode="tvd"``: LANTERN's set ``A_{k,delta}(x)``, TVD of the move <= delta) or
    ``S <= (lam - 1) p(x)`` (``mode="multiplicative"``, LANTERN++). The relaxed target ``p~_x``
    moves that mass onto ``x``: ``p~_x(x) = p(x) + S``, ``p~_x(n_i) = 0`` for ``i <= j``, ``p``
    elsewhere — a distribution with ``TVD(p~_x, p) = S``. Acceptance is ``min(1, p~_x(x) / q(x))``
    (LANTERN's rule), never lower than exact acceptance.

    Residual choice: ``norm(max(0, p~_x - q))``. It is consistent with the mass actually moved —
    the counted neighbours' mass went to ``x``, so they are not resampled — and it makes a
    deterministic draft's committed token exactly ``p~_x``-distributed (the reference
    implementation's sampling tree verification zeroes *all* listed neighbours of a rejected token,
    counted or not, which does not match the mass moved). Bonus tokens come from ``p``: there is no
    draft token to relax around, and ``moved_mass`` is 0 there.

    Greedy configurations (one-hot targets): moving mass between one-hot distributions costs a
    total variation of 1, so ``delta < 1`` relaxes nothing. ``greedy_neighbours = m > 0`` defines
    LANTERN's greedy mode for mmspec: where the target row is one-hot at ``a`` (greedy decoding,
    or a sampled distribution that collapsed onto one token), a draft ``x != a`` that is one of
    ``a``'s ``m`` nearest latent neighbours (``x in neighbours[a, :m]``) is accepted in place of
    ``a`` (``moved_mass`` 1); any other draft is accepted iff it is ``a``, and a rejection commits
    ``a``. ``m = 0`` (default) keeps greedy decoding exact.

    Args:
        neighbours: ``[V, K]`` int table of latent neighbours (``K >= k``), from
            :func:`load_or_build_neighbours`. Required.
        delta: TVD budget per token, ``0 <= delta <= 1`` (``mode="tvd"``; default 0.1).
        k: neighbours considered, ``1 <= k <= V - 1`` (default 1000).
        mode: ``"tvd"`` (LANTERN) or ``"multiplicative"`` (LANTERN++).
        lam: ``lambda >= 1`` for ``mode="multiplicative"`` (the LANTERN++ scripts use 3 with k=10).
        greedy_neighbours: ``m`` above, ``0 <= m <= k`` (``variant="mmspec"`` only).
        variant: ``"mmspec"`` (default; everything above: lossy with the stated bound) or ``"official"``
            (lossy, **no bound**: reproduces ``jadohu/LANTERN``'s ``evaluate_posterior`` /
            ``evaluate_posterior_v1``, :mod:`mmspec.relaxed_official`): the same acceptance
            ``min(1, (p(x) + S) / q(x))`` (float32 prefix sums), but after a rejection the official
            residual of the tree type, which zeroes ``x`` and the first ``k + 1`` listed neighbours
            whenever one was counted, whether or not it was; ``moved_mass`` reports TVD between the
            target and the committed token's law for a deterministic draft of ``x``. The neighbour table needs
            ``min(k + 1, V - 1)`` columns, from raw codebook rows to match the official tables
            (``LlamaGenPipeline``: ``neighbour_rows="raw"``, the official variant's default).
        official_path: the official residual path (``variant="official"``): ``"auto"`` (default:
            ``"dynamic"`` for deterministic drafts, ``"static-llamagen"`` when drafts carry
            probabilities), ``"dynamic"`` (EAGLE-2 trees: ``qx = 1``, zero ``x`` and the neighbours
            of the target), ``"static-llamagen"`` (EAGLE-1 trees on LlamaGen: ``norm(max(0, p - q'))``,
            ``q'`` = draft zeroed at the neighbours) or ``"static-lumina"`` (EAGLE-1 on Lumina-mGPT:
            ``norm(max(0, p' - q))``, ``p'`` = target zeroed there). Static paths accept with EAGLE-1's
            ``qx``: the node's proposal before earlier siblings were removed (its first sibling's).
        greedy: official greedy mode (``variant="official"``; needs a greedy run): the rule reads the
            softmax at temperature 1 of the (CFG-combined) logits and keeps draft ``x`` iff raising
            ``p(x)`` by ``S`` makes it the argmax; the next token is the argmax. Lossy, no bound (an
            accepted stand-in differs from greedy decoding: TVD 1 at that token).
    """

    name = "lantern"
    resource_arguments = ("neighbours",)
    resource_options = ("neighbour_cache", "neighbour_rows")
    bound = (
        "per draft token x, TVD(p~_x, p) = S <= delta (mode 'tvd') or p~_x(x) = p(x) + S <= lam * p(x) "
        "(mode 'multiplicative'); a deterministic draft's committed token is distributed exactly as p~_x; "
        "for stochastic drafts TVD(committed law, p) <= acceptance probability gained over exact sampling; "
        "trees: each tested sibling moves <= delta and moved_mass sums them; greedy stand-ins "
        "(greedy_neighbours=m) are the argmax or one of its m nearest codebook neighbours (TVD 1); "
        "moved_mass reports TVD(p~_x, p) per committed token"
    )

    def __init__(
        self,
        neighbours: torch.Tensor | None = None,
        delta: float = 0.1,
        k: int = 1000,
        mode: str = "tvd",
        lam: float | None = None,
        greedy_neighbours: int = 0,
        variant: str = "mmspec",
        official_path: str = "auto",
        greedy: bool = False,
    ) -> None:
        if neighbours is None:
            raise ValueError(
                f"LANTERN needs the latent neighbour table of the target's VQ codebook: {_BUILD_HINT}, "
                "then pass it as LanternAcceptance(neighbours=table, ...)"
            )
        if (
            not isinstance(neighbours, torch.Tensor)
            or neighbours.dim() != 2
            or neighbours.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(f"neighbours must be an int32/int64 tensor [V, K]; {_BUILD_HINT}")
        vocab, columns = neighbours.shape
        if mode not in ("tvd", "multiplicative"):
            raise ValueError(f"mode must be 'tvd' (LANTERN) or 'multiplicative' (LANTERN++), got {mode!r}")
        if mode == "tvd" and not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1] (a total-variation budget; 0 = exact acceptance), got {delta}")
        if mode == "multiplicative" and (lam is None or not lam >= 1.0):
            raise ValueError(
                f"mode='multiplicative' needs lam >= 1 (p~(x) <= lam * p(x); 1 = exact acceptance), got {lam}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab - 1:
            raise ValueError(
                f"k must be an int in [1, {vocab - 1}] (codebook size - 1) for a codebook of {vocab} codes, got {k!r}"
            )
        if k > columns:
            raise ValueError(
                f"the neighbour table holds {columns} neighbours per token but k={k}: rebuild it with k={k} ({_BUILD_HINT})"
            )
        if (
            isinstance(greedy_neighbours, bool)
            or not isinstance(greedy_neighbours, int)
            or not 0 <= greedy_neighbours <= k
        ):
            raise ValueError(f"greedy_neighbours must be an int in [0, k={k}], got {greedy_neighbours!r}")
        if variant not in VARIANTS:
            raise ValueError(
                f"variant must be one of {VARIANTS} (mmspec's bounded rule or the official code), got {variant!r}"
            )
        if official_path not in LANTERN_PATHS:
            raise ValueError(f"official_path must be one of {LANTERN_PATHS}, got {official_path!r}")
        if greedy is not True and greedy is not False:
            raise ValueError(f"greedy must be true or false, got {greedy!r}")
        if variant == "mmspec" and (official_path != "auto" or greedy):
            raise ValueError(
                "official_path and greedy are options of variant='official' "
                "(mmspec's own greedy relaxation is greedy_neighbours=m)"
            )
        if variant == "official" and greedy_neighbours:
            raise ValueError("greedy_neighbours is mmspec's greedy relaxation; the official one is greedy=True")
        official_columns = min(k + 1, vocab - 1)  # the official residual zeroes nearest_latents[x, :k + 1]
        if variant == "official" and columns < official_columns:
            raise ValueError(
                f"variant='official' zeroes the first k + 1 = {official_columns} neighbours after a rejection but "
                f"the table holds {columns}: rebuild it with k={official_columns} ({_BUILD_HINT})"
            )
        table = neighbours[:, : official_columns if variant == "official" else k]
        # Init-time checks (host syncs here are fine): ids in range, no self, no repeats.
        if bool(((table < 0) | (table >= vocab)).any()):
            raise ValueError(f"neighbour ids must lie in [0, {vocab}); {_BUILD_HINT}")
        if bool((table == torch.arange(vocab, device=table.device)[:, None]).any()):
            raise ValueError(f"a token must not be its own neighbour (row v of the table lists v); {_BUILD_HINT}")
        if table.shape[1] > 1 and bool((table.sort(1).values.diff(dim=1) == 0).any()):
            raise ValueError(f"a token's neighbours must be distinct; {_BUILD_HINT}")
        self.official_table = table  # [V, k] (mmspec) or [V, min(k + 1, V - 1)] (official)
        table = table[:, :k]
        self.neighbours = table
        self.delta = float(delta)
        self.k = k
        self.mode = mode
        self.lam = None if lam is None else float(lam)
        self.greedy_neighbours = greedy_neighbours
        self.variant = variant
        self.official_path = official_path
        self.greedy = greedy
        if variant == "official":
            self.bound = (
                "no bound: reproduces the official LANTERN code (jadohu/LANTERN evaluate_posterior / "
                "evaluate_posterior_v1); moved_mass reports TVD(committed law, p) for a deterministic draft of x"
            )
        self.requires_greedy = greedy
        self._tables: dict[str, torch.Tensor] = {}

    @classmethod
    def from_resources(cls, resources: dict, **options) -> LanternAcceptance:
        """LANTERN over a pipeline's VQ codebook. ``k`` defaults to LANTERN's 1000 neighbours, capped
        at the codebook size - 1. ``neighbour_rows``: ``"decoder"`` (mmspec's default: the rows the
        decoder looks up, ``resources["codebook"]``, L2-normalised for LlamaGen's cosine codebook) or
        ``"raw"`` (the stored ``quantize.embedding.weight``, ``resources["codebook_raw"]``, as the official
        ``generate_codebook.py``; the default of ``variant="official"``, whose table also holds the
        ``k + 1`` neighbours its residual zeroes; ``resources["codebook_l2_norm"]`` says whether the
        decoder normalises the stored rows). The table is built once, cached on disk under
        ``resources["cache_dir"]`` (or the option ``neighbour_cache``) and kept in ``resources["memo"]``."""
        if "codebook" not in resources:
            raise ValueError("acceptance='lantern' needs a pipeline with a VQ codebook (latent neighbourhoods)")
        vocab = resources["codebook"].shape[0]
        k = options.pop("k", min(1000, vocab - 1))
        cache_dir = options.pop("neighbour_cache", resources.get("cache_dir"))
        official = options.get("variant", "mmspec") == "official"
        rows = options.pop("neighbour_rows", "raw" if official else "decoder")
        if rows not in ("decoder", "raw"):
            raise ValueError(
                f"neighbour_rows must be 'decoder' (the rows as decoded) or 'raw' "
                f"(quantize.embedding.weight, as the official LANTERN code), got {rows!r}"
            )
        columns = min(k + 1, vocab - 1) if official and isinstance(k, int) else k
        # Decoder rows = the stored rows, L2-normalised where the decoder normalises them (as the
        # official table is built from the stored rows): one table per (k, rows) choice.
        stored = "codebook_raw" in resources
        codebook = resources["codebook_raw"] if stored else resources["codebook"]
        normalize = stored and rows == "decoder" and bool(resources.get("codebook_l2_norm", False))
        key = ("lantern", columns, rows)
        memo = resources.setdefault("memo", {})
        if key not in memo:
            memo[key] = load_or_build_neighbours(codebook.detach().float(), columns, cache_dir, normalize=normalize)
        return cls(memo[key], k=k, **options)

    def __repr__(self) -> str:
        budget = f"delta={self.delta}" if self.mode == "tvd" else f"lam={self.lam}"
        if self.variant == "official":
            return (
                f"LanternAcceptance(variant='official', mode={self.mode!r}, {budget}, k={self.k}, "
                f"official_path={self.official_path!r}, greedy={self.greedy})"
            )
        return (
            f"LanternAcceptance(mode={self.mode!r}, {budget}, k={self.k}, greedy_neighbours={self.greedy_neighbours})"
        )

    def target_sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        """Official greedy mode reads the softmax at temperature 1 of the CFG-combined logits (no top-k /
        top-p), as ``evaluate_posterior``'s ``torch.softmax(logits)``; otherwise the run's own."""
        if self.greedy:
            return SamplingConfig(temperature=1.0, guidance_scale=sampling.guidance_scale)
        return sampling

    def verify(self, draft: Draft, target: Distribution | None, generator: torch.Generator | None) -> Verdict:
        target_probs = self._probs(target)
        if self.variant == "mmspec":
            return super().verify(draft, target, generator)
        self.check_vocab(target_probs.shape[-1])
        table = _device_copy(self._tables, self.official_table, target_probs.device)
        relative = self.mode == "multiplicative"
        limit = self.lam - 1.0 if relative else self.delta
        if self.greedy:
            return verify_lantern_official_greedy(
                draft, target_probs.float(), neighbours=table, k=self.k, limit=limit, relative=relative
            )
        batch, num_nodes = draft.tokens.shape
        uniform_accept = torch.rand(batch, num_nodes, generator=generator, device=target_probs.device)
        uniform_sample = torch.rand(batch, generator=generator, device=target_probs.device)
        return verify_lantern_official(
            draft,
            target_probs.float(),
            uniform_accept,
            uniform_sample,
            neighbours=table,
            k=self.k,
            limit=limit,
            relative=relative,
            path=self.official_path,
        )

    def check_vocab(self, vocab_size: int) -> None:
        if self.neighbours.shape[0] != vocab_size:
            raise ValueError(
                f"the LANTERN neighbour table has {self.neighbours.shape[0]} rows but the target vocabulary has "
                f"{vocab_size} tokens: the table must come from the target's own VQ codebook; {_BUILD_HINT}"
            )

    def relaxed_target(
        self, probs: torch.Tensor, tokens: torch.Tensor, draft_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``p~_x`` for every row (see the class docstring) and ``TVD(p~_x, p)``."""
        neighbours = _device_copy(self._tables, self.neighbours, probs.device)  # [V, k]
        p = probs.float()  # [R, V]
        x = tokens.long()  # [R]
        if self.mode == "tvd":
            mass, count = lantern_neighbour_mass(p, x, neighbours, self.delta)  # [R], [R]
        else:
            mass, count = lantern_neighbour_mass(p, x, neighbours, self.lam - 1.0, relative=True)
        ids = neighbours[x].long()  # [R, k]
        counted = torch.arange(self.k, device=p.device)[None] < count[:, None]  # [R, k]
        relaxed = p.clone()
        relaxed.scatter_(1, ids, torch.where(counted, 0.0, p.gather(1, ids)))
        relaxed.scatter_(1, x[:, None], p.gather(1, x[:, None]) + mass[:, None])  # x is not its own neighbour
        moved = mass
        if self.greedy_neighbours:
            top = p.argmax(-1)  # [R]
            one_hot = p.gather(1, top[:, None])[:, 0] == 1.0
            near = (neighbours[top, : self.greedy_neighbours] == x[:, None]).any(-1)
            stand_in = one_hot & (x != top) & near  # [R]
            relaxed = torch.where(stand_in[:, None], F.one_hot(x, p.shape[-1]).float(), relaxed)
            moved = torch.where(stand_in, 1.0, moved)
        return relaxed, moved


# --------------------------------------------------------------------------------------------
# GSD
# --------------------------------------------------------------------------------------------


@register_acceptance_rule
class GSDAcceptance(RelaxedAcceptance):
    """Grouped Speculative Decoding (So et al. 2025, arXiv 2508.07747, dynamic GSD): accept draft ``x``
    with ``min(1, sum_G p / sum_G q)`` over a dynamic group ``G`` of tokens that the target finds
    about as likely as ``x`` and that look alike.

    Group (the paper's dynamic clustering, as its reference code builds it): the ``group_size``
    tokens around ``x`` in the target's probability ranking (:func:`gsd_candidates`), kept if
    ``|p(c) - p(x)| <= prob_threshold`` and ``||e_c - e_x||^2 <= dist_threshold`` (squared
    Euclidean distance of ``embeddings`` rows: the VQ codebook or the GPT's token embedding, the
    caller chooses; the reference code uses the GPT's). ``x`` is always in its group;
    ``group_size=1`` is exact acceptance, token for token.

    Acceptance: ``max(p(x) / q(x), P(G) / Q(G))`` capped at 1, with ``P = sum_G p``,
    ``Q = sum_G q``. The paper's ratio alone can fall below exact acceptance when the other
    members are over-proposed (``q >> p`` there); taking the larger ratio keeps every draft's
    acceptance at least the exact one (a deliberate deviation, for a guarantee).

    Relaxed target and residual: where the group ratio is used, ``p~_x(x) = q(x) P(G) / Q(G)``
    and the mass ``x`` gains, ``q(x) P/Q - p(x) <= P(G \\ {x})``, is taken from the other members in
    proportion to their target probability (``p`` elsewhere), so ``p~_x <= p`` off ``x`` and
    ``TVD(p~_x, p) = q(x) P/Q - p(x)``. At a rejection the recovered token comes from
    ``norm(max(0, p~_x - q))`` — the members' mass that ``x`` absorbed is not handed out again —
    where the reference code resamples ``max(0, p - q)`` regardless of the group. With a
    deterministic draft ``p~_x`` puts all of ``P(G)`` on ``x``.

    Greedy (one-hot targets): the argmax differs from every other token's probability by 1, so it
    joins no group unless ``prob_threshold >= 1``; greedy decoding stays exact.

    Args:
        embeddings: ``[V, C]`` token embeddings for the distance filter. Required.
        group_size: candidates per group G >= 1 (reference code 14, the paper reports 25-50).
        prob_threshold: ``|p(c) - p(x)|`` limit (reference 0.15).
        dist_threshold: squared-distance limit (reference 0.5).
        variant: ``"mmspec"`` (default; everything above: lossy with the stated bound) or ``"official"``
            (lossy, **no bound**: reproduces ``junhyukso/GSD``'s ``SpeculativeSampler.__call__``,
            :mod:`mmspec.relaxed_official`): acceptance ``min(1, P(G) / Q(G))`` even where it is below
            ``p(x) / q(x)``; residual ``norm(max(0, p - q))``; the window is the official slice
            ``[pos - G//2 : pos + (G+1)//2]`` of the ascending ranking, empty for the ``G // 2``
            lowest-ranked tokens (plain ``min(1, p/q)`` there); strict ``<`` filters. ``moved_mass``
            reports TVD between the target and the committed token's law for a deterministic draft of ``x``.
    """

    name = "gsd"
    resource_arguments = ("embeddings",)
    resource_options = ("embedding",)
    bound = (
        "per draft token x, TVD(p~_x, p) = q(x) P(G)/Q(G) - p(x) <= P(G \\ {x}) <= (G - 1)(p(x) + prob_threshold), "
        "0 where the group does not raise acceptance; acceptance >= exact acceptance for every draft; a "
        "deterministic draft's committed token is distributed exactly as p~_x; for stochastic drafts "
        "TVD(committed law, p) <= acceptance probability gained over exact sampling; the paper itself states "
        "no distribution bound (it measures FID / CLIP); moved_mass reports TVD(p~_x, p) per committed token"
    )

    def __init__(
        self,
        embeddings: torch.Tensor | None = None,
        group_size: int = 14,
        prob_threshold: float = 0.15,
        dist_threshold: float = 0.5,
        variant: str = "mmspec",
    ) -> None:
        if embeddings is None:
            raise ValueError(
                "GSD needs token embeddings for its distance filter: pass embeddings=vq.codebook_embeddings() "
                "(VQ codebook) or embeddings=gpt.tok_embeddings.weight (the GPT's token embedding)"
            )
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError(
                f"embeddings must be a [V, C] tensor, got {getattr(embeddings, 'shape', type(embeddings))}"
            )
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1 (1 = exact acceptance), got {group_size!r}")
        if group_size > embeddings.shape[0]:
            raise ValueError(
                f"group_size={group_size} is more than the {embeddings.shape[0]} tokens of the vocabulary a "
                f"group is drawn from: use at most {embeddings.shape[0]} (the paper: 25-50)"
            )
        if not prob_threshold >= 0 or not dist_threshold >= 0:
            raise ValueError(
                f"thresholds must be >= 0, got prob_threshold={prob_threshold}, dist_threshold={dist_threshold}"
            )
        self.embeddings = embeddings.detach().float()
        self.group_size = group_size
        self.prob_threshold = float(prob_threshold)
        self.dist_threshold = float(dist_threshold)
        if variant not in VARIANTS:
            raise ValueError(
                f"variant must be one of {VARIANTS} (mmspec's bounded rule or the official code), got {variant!r}"
            )
        self.variant = variant
        if variant == "official":
            self.bound = (
                "no bound: reproduces the official GSD code (junhyukso/GSD SpeculativeSampler); "
                "moved_mass reports TVD(committed law, p) for a deterministic draft of x"
            )
        self._tables: dict[str, torch.Tensor] = {}

    @classmethod
    def from_resources(cls, resources: dict, **options) -> GSDAcceptance:
        """GSD with distances in the pipeline's VQ codebook (``embedding="codebook"``, default when
        the pipeline has one) or its token embedding (``embedding="tokens"``)."""
        embedding = options.pop("embedding", "codebook" if "codebook" in resources else "tokens")
        tables = {"codebook": "codebook", "tokens": "token_embeddings"}
        if embedding not in tables:
            raise ValueError(f"GSD embedding must be one of {sorted(tables)}, got {embedding!r}")
        if tables[embedding] not in resources:
            raise ValueError(f"GSD embedding={embedding!r}: this pipeline offers {sorted(resources)}")
        return cls(resources[tables[embedding]].detach().float(), **options)

    def __repr__(self) -> str:
        variant = "variant='official', " if self.variant == "official" else ""
        return (
            f"GSDAcceptance({variant}group_size={self.group_size}, prob_threshold={self.prob_threshold}, "
            f"dist_threshold={self.dist_threshold})"
        )

    def verify(self, draft: Draft, target: Distribution | None, generator: torch.Generator | None) -> Verdict:
        target_probs = self._probs(target)
        if self.variant == "mmspec":
            return super().verify(draft, target, generator)
        self.check_vocab(target_probs.shape[-1])
        batch, num_nodes = draft.tokens.shape
        uniform_accept = torch.rand(batch, num_nodes, generator=generator, device=target_probs.device)
        uniform_sample = torch.rand(batch, generator=generator, device=target_probs.device)
        embeddings = _device_copy(self._tables, self.embeddings, target_probs.device)
        return verify_gsd_official(
            draft,
            target_probs.float(),
            uniform_accept,
            uniform_sample,
            embeddings=embeddings,
            group_size=self.group_size,
            prob_threshold=self.prob_threshold,
            dist_threshold=self.dist_threshold,
        )

    def check_vocab(self, vocab_size: int) -> None:
        if self.embeddings.shape[0] != vocab_size:
            raise ValueError(
                f"GSD embeddings have {self.embeddings.shape[0]} rows but the target vocabulary has {vocab_size} "
                "tokens: pass the target's own VQ codebook or token embedding"
            )

    def group(self, probs: torch.Tensor, tokens: torch.Tensor, draft_probs: torch.Tensor | None):
        """``(candidates [R, G], p_sum [R], q_sum [R], members [R, G])`` of every row's draft token."""
        embeddings = _device_copy(self._tables, self.embeddings, probs.device)
        candidates = gsd_candidates(probs, tokens, self.group_size)
        p_sum, q_sum, members = gsd_group_mass(
            probs, draft_probs, tokens, candidates, embeddings, self.prob_threshold, self.dist_threshold
        )
        return candidates, p_sum, q_sum, members

    def relaxed_target(
        self, probs: torch.Tensor, tokens: torch.Tensor, draft_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``p~_x`` for every row (see the class docstring) and ``TVD(p~_x, p)``."""
        p = probs.float()  # [R, V]
        x = tokens.long()  # [R]
        candidates, p_sum, q_sum, members = self.group(p, x, draft_probs)  # [R, G], [R], [R], [R, G]
        ids = candidates.clamp_min(0)
        p_c = p.gather(1, ids)  # [R, G]
        p_x = p.gather(1, x[:, None])[:, 0]  # [R]
        q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.float().gather(1, x[:, None])[:, 0]
        others = members & (ids != x[:, None])  # [R, G] members other than x
        # The group raises acceptance iff P(G)/Q(G) > p(x)/q(x) (cross-multiplied; Q >= q(x) > 0).
        grouped = others.any(-1) & (p_sum * q_x > p_x * q_sum)  # [R]
        ratio = p_sum / torch.where(q_sum > 0, q_sum, 1.0)
        others_mass = torch.where(others, p_c, 0.0).sum(-1)  # [R] target mass of the other members
        gain = torch.minimum(q_x * ratio - p_x, others_mass).clamp_min(0.0)  # <= others_mass but for rounding
        gain = torch.where(grouped, gain, 0.0)
        keep = 1.0 - gain / torch.where(others_mass > 0, others_mass, 1.0)  # [R] share the others keep
        x_value = p_x + gain
        values = torch.where(others, p_c * keep[:, None], p_c)
        values = torch.where(ids == x[:, None], x_value[:, None], values)
        # Slots outside the vocabulary write x's own new value at x: every write to an index agrees.
        valid = candidates >= 0
        relaxed = p.clone().scatter_(
            1, torch.where(valid, ids, x[:, None]), torch.where(valid, values, x_value[:, None])
        )
        return relaxed, gain
