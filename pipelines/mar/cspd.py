"""CSpD on the masked loop (Wang et al. 2024, "Continuous Speculative Decoding for Autoregressive
Image Generation", arXiv 2411.11925) for MAR: two roles of :func:`mmspec.loops.masked_generate`.

* :class:`MARDrafter` — a draft MAR (same VAE latents; any size) runs the next ``gamma`` AR steps
  of the plan from the committed state and proposes their tokens with their densities: the
  Gaussian of the diffusion head's LAST reverse step, ``N(mu_0, (T sigma_0)^2)`` (CSpD §3.2), each
  token a draw from it.
* :class:`MARVerifyTarget` — the target MAR; ``verify(positions)`` is ONE forward from the state
  at the previous verification (everything written except the set under test) and returns the
  target's last-step Gaussians for those tokens (``DiagonalGaussian``); the elementwise rule
  (``"gaussian-exact"``: density ratio, exact residual) decides every token on its own.

Trajectory alignment (CSpD §3.3): every token's noises (x_T and the per-step noises of the
diffusion head) are drawn once, up front, in the baseline's order, and filed by position
(:meth:`~mmspec.pipelines.mar.sampling.MARPlan.draw_noise`): draft and target denoise the same
token from the same noises. Pre-filling (§3.4): the target runs the first ``prefill_steps`` AR
steps itself.

What the committed tokens are distributed as: each token of a draft set is distributed as the
target's last-step Gaussian given the state at the previous verification — so with ``gamma`` steps
per draft the target predicts ``gamma`` steps' tokens from one context, like MAR with fewer AR
steps (compare against the baseline at ``num_iter / gamma``). With ``gamma = 1`` and draft = target
every draft is accepted and the output equals the baseline with ``sample_last_step=True``.
"""

from __future__ import annotations

from typing import Any

import torch

from mmspec.types import DiagonalGaussian, Draft, Regeneration

from .modeling_mar import MARModel
from .sampling import MARPlan, predict_tokens


class MARVerifyTarget:
    """The target MAR as a :class:`~mmspec.types.MaskedTarget` over the ``L`` tokens ``[B, L, C]``
    of one generation (``plan`` with its noises drawn). ``steps`` counts target forwards, the
    ``prefill_steps`` AR steps of :meth:`prefill` included."""

    def __init__(
        self,
        model: MARModel,
        plan: MARPlan,
        labels: torch.Tensor | None,
        cfg: bool,
        temperature: float,
        prefill_steps: int = 0,
    ) -> None:
        if not 0 <= prefill_steps <= plan.num_iter:
            raise ValueError(f"prefill_steps must be in [0, num_iter = {plan.num_iter}], got {prefill_steps}")
        self.model, self.plan, self.labels, self.cfg, self.temperature = model, plan, labels, cfg, temperature
        self.prefill_steps = prefill_steps
        batch, seq_len = plan.orders.shape
        self.num_elements = seq_len
        self.steps = 0
        device = model.device
        self._tokens = torch.zeros(batch, seq_len, model.token_embed_dim, device=device, dtype=model.dtype)
        self.written = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)

    @property
    def elements(self) -> torch.Tensor:
        return self._tokens

    def _predict(self, positions: torch.Tensor, unknown: torch.Tensor):
        init, steps = self.plan.noise_at(positions)
        scale = self.plan.cfg_of.gather(1, positions).reshape(-1, 1)
        self.steps += 1
        return predict_tokens(
            self.model,
            self._tokens,
            unknown,
            self.labels,
            self.cfg,
            positions,
            scale,
            self.temperature,
            init,
            steps,
            sample_last_step=True,
        )

    def prefill(self, condition: Any) -> None:
        """The first ``prefill_steps`` AR steps, by the target itself."""
        for k in range(self.prefill_steps):
            positions = self.plan.positions[k]
            out = self._predict(positions, ~self.written)
            self.write(positions, out.tokens.view(*positions.shape, -1), torch.ones_like(positions, dtype=torch.bool))

    def finished(self) -> torch.Tensor:
        return self.written.all(1)

    def write(self, positions: torch.Tensor, elements: torch.Tensor, mask: torch.Tensor) -> None:
        current = self._tokens.gather(1, positions[..., None].expand_as(elements))
        values = torch.where(mask[..., None], elements.to(self._tokens.dtype), current)
        self._tokens.scatter_(1, positions[..., None].expand_as(elements), values)
        self.written.scatter_(1, positions, self.written.gather(1, positions) | mask)

    def _context(self, positions: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` True where unknown for a verify of ``positions``: not written, or under test."""
        under_test = torch.zeros_like(self.written).scatter_(1, positions, True)
        return ~self.written | under_test

    def verify(self, positions: torch.Tensor) -> DiagonalGaussian:
        """One forward from the previous verification's state: the target's last-step Gaussians of
        the tokens at ``positions [B, k]`` (``mean``/``std`` ``[B, k, C]``)."""
        out = self._predict(positions, self._context(positions))
        shape = (*positions.shape, -1)
        return DiagonalGaussian(out.mean.view(shape), out.std.view(shape))

    def regenerate(
        self, positions: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None
    ) -> Regeneration:
        """Draw the masked tokens from the target (one forward from the same context as
        :meth:`verify`, the same filed noises). ``"gaussian-exact"`` never hands tokens back; a
        rule that does gets them here."""
        step = torch.full(positions.shape, -1, dtype=torch.long, device=positions.device)
        if not bool(mask.any()):  # deliberate host sync: the common case does nothing
            return Regeneration(step)
        out = self._predict(positions, self._context(positions))
        self.write(positions, out.tokens.view(*positions.shape, -1), mask)
        return Regeneration(step.masked_fill(mask, self.steps))


class MARDrafter:
    """A draft MAR as a :class:`~mmspec.types.MaskedDrafter`: each call runs the next ``gamma`` AR
    steps of ``plan`` (from the target's committed state) and proposes their tokens, each with the
    Gaussian it was drawn from (``Draft.proposal``). ``forwards`` counts draft MAE forwards."""

    def __init__(self, model: MARModel, gamma: int) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(
                f"num_draft_tokens (CSpD's gamma: AR steps per draft) must be an integer >= 1, got {gamma!r}"
            )
        self.model, self.gamma = model, gamma
        self.forwards = 0
        self.next_step: int | None = None

    def draft(self, condition: Any, target: MARVerifyTarget, generator: torch.Generator | None) -> Draft:
        plan = target.plan
        if self.next_step is None:
            self.next_step = target.prefill_steps
        tokens = target.elements.clone().to(self.model.dtype)  # [B, L, C] the committed state
        unknown = ~target.written
        positions, drafts, means, stds = [], [], [], []
        last = min(self.next_step + self.gamma, plan.num_iter)
        for k in range(self.next_step, last):
            pos = plan.positions[k]  # [B, n_k]
            init, steps = plan.noise_at(pos)
            scale = plan.cfg_of.gather(1, pos).reshape(-1, 1)
            out = predict_tokens(
                self.model,
                tokens,
                unknown,
                target.labels,
                target.cfg,
                pos,
                scale,
                target.temperature,
                init,
                steps,
                sample_last_step=True,
            )
            self.forwards += 1
            shape = (*pos.shape, -1)
            tokens.scatter_(1, pos[..., None].expand(*pos.shape, tokens.shape[-1]), out.tokens.view(shape))
            unknown = unknown.scatter(1, pos, False)
            positions.append(pos)
            drafts.append(out.tokens.view(shape))
            means.append(out.mean.view(shape))
            stds.append(out.std.view(shape))
        self.next_step = last
        return Draft(
            tokens=torch.cat(drafts, 1),
            positions=torch.cat(positions, 1),
            proposal=DiagonalGaussian(torch.cat(means, 1), torch.cat(stds, 1)),
        )
