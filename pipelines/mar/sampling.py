"""MAR's masked generation (MAR §3.4, official ``MAR.sample_tokens``), split into a plan and steps
so that the baseline, CSpD's drafter and CSpD's target all run the same arithmetic.

* :class:`MARPlan`: the generation order (random per row), the cosine mask schedule, each step's
  predicted positions and guidance, and (for CSpD) every token's noises drawn up front.
* :func:`draw_step_noise`: the torch draws of one official AR step, in the official order
  (``randn(n, C)`` = x_T of the conditional rows, then one ``randn(N, C)`` per diffusion step,
  N = 2n under CFG; the null rows' draws are made but never influence a token).
* :func:`mar_step`: one AR step of a model from a state (tokens, mask) for given positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .modeling_mar import MARModel, MARStep, TokenGaussian, mar_schedule


def draw_step_noise(
    generator: torch.Generator | None, num: int, channels: int, num_steps: int, cfg: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of one AR step predicting ``num`` tokens (all rows): ``init [num, C]`` and
    ``steps [S, num, C]`` (the conditional rows of each ``randn_like`` draw)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    init = torch.randn(num, channels, generator=generator, device=gen_device)
    rows = 2 * num if cfg else num
    steps = torch.stack(
        [torch.randn(rows, channels, generator=generator, device=gen_device)[:num] for _ in range(num_steps)]
    )
    return init.to(device), steps.to(device)


@dataclass
class MARPlan:
    """One generation's schedule: ``orders [B, L]``, ``steps`` (per AR step: counts and guidance),
    ``positions[k] [B, n_k]`` the positions step ``k`` predicts (ascending per row: the official
    code writes a step's tokens in row-major order of (row, position)), ``step_of [B, L]`` the step
    predicting each position, ``cfg_of [B, L]`` its guidance scale; with :meth:`draw_noise`,
    ``noise_init [B, L, C]`` / ``noise_steps [S, B, L, C]`` every token's noises (the same draws
    as the baseline's, drawn up front and filed by position: trajectory alignment)."""

    orders: torch.Tensor
    steps: list[MARStep]
    positions: list[torch.Tensor]
    step_of: torch.Tensor
    cfg_of: torch.Tensor
    noise_init: torch.Tensor | None = None
    noise_steps: torch.Tensor | None = None

    @classmethod
    def build(cls, orders: torch.Tensor, num_iter: int, guidance_scale: float, cfg_schedule: str) -> MARPlan:
        batch, seq_len = orders.shape
        steps = mar_schedule(num_iter, seq_len, guidance_scale, cfg_schedule)
        positions, start = [], seq_len
        step_of = torch.empty(batch, seq_len, dtype=torch.long, device=orders.device)
        cfg_of = torch.empty(batch, seq_len, dtype=torch.float32, device=orders.device)
        for k, step in enumerate(steps):
            end = 0 if k == len(steps) - 1 else step.mask_len_next
            pos = orders[:, end:start].sort(dim=1).values  # [B, n_k]
            positions.append(pos)
            step_of.scatter_(1, pos, k)
            cfg_of.scatter_(1, pos, step.cfg)
            start = end
        return cls(orders, steps, positions, step_of, cfg_of)

    @property
    def num_iter(self) -> int:
        return len(self.steps)

    def draw_noise(
        self, generator: torch.Generator | None, channels: int, num_steps: int, cfg: bool, device: torch.device
    ) -> None:
        """Draw every step's noises in the official order and file them by position."""
        batch, seq_len = self.orders.shape
        self.noise_init = torch.zeros(batch, seq_len, channels, device=device)
        self.noise_steps = torch.zeros(num_steps, batch, seq_len, channels, device=device)
        for pos in self.positions:
            n = pos.shape[1]
            init, steps = draw_step_noise(generator, batch * n, channels, num_steps, cfg, device)
            idx = pos.to(device)[..., None].expand(batch, n, channels)
            self.noise_init.scatter_(1, idx, init.view(batch, n, channels))
            self.noise_steps.scatter_(
                2, idx[None].expand(num_steps, -1, -1, -1), steps.view(num_steps, batch, n, channels)
            )

    def noise_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The filed noises of ``positions [B, k]``: ``init [B*k, C]``, ``steps [S, B*k, C]``."""
        if self.noise_init is None or self.noise_steps is None:
            raise RuntimeError("MARPlan.draw_noise was not called")
        batch, k = positions.shape
        channels = self.noise_init.shape[-1]
        idx = positions[..., None].expand(batch, k, channels)
        init = self.noise_init.gather(1, idx).reshape(batch * k, channels)
        num_steps = self.noise_steps.shape[0]
        steps = self.noise_steps.gather(2, idx[None].expand(num_steps, -1, -1, -1)).reshape(
            num_steps, batch * k, channels
        )
        return init, steps


def gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x [B, L, D]`` at ``positions [B, k]`` -> ``[B*k, D]`` (row-major)."""
    batch, k = positions.shape
    return x.gather(1, positions[..., None].expand(batch, k, x.shape[-1])).reshape(batch * k, x.shape[-1])


def predict_tokens(
    model: MARModel,
    tokens: torch.Tensor,
    unknown: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: bool,
    positions: torch.Tensor,
    cfg_scale: torch.Tensor | float,
    temperature: float,
    noise_init: torch.Tensor,
    noise_steps: torch.Tensor,
    sample_last_step: bool,
) -> TokenGaussian:
    """One MAE forward from the state ``tokens [B, L, C]`` / ``unknown [B, L]`` (True = not yet
    known; every row the same count), then the diffusion head for ``positions [B, k]``:
    tokens, last-step means and stds ``[B*k, C]``."""
    z = model(tokens, unknown, labels, cfg=cfg)  # [B or 2B, L, D]
    batch = tokens.shape[0]
    z_cond = gather_rows(z[:batch], positions)
    z_null = gather_rows(z[batch:], positions) if cfg else None
    return model.sample_head(z_cond, z_null, cfg_scale, temperature, noise_init, noise_steps, sample_last_step)
