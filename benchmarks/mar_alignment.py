"""Why the embedded MAR pair does not agree under CSpD's exact rule: for the first AR step's tokens
(4 rows, classes 0-3, guidance 3, seed 0, shared noises) compare the last reverse step's Gaussians of
draft and target — (a) each on its own denoising trajectory (what ``speculative="cspd"`` verifies),
(b) the target's last step taken from the draft's x_1 (a variant that only tests the final step;
not exact for the target's law). Prints sigma, the mean gap in sigmas, and (b)'s acceptance.
Run from /tmp: ``python benchmarks/mar_alignment.py``.
"""

from __future__ import annotations

import torch

from mmspec.app.defaults import load_default_mar
from mmspec.pipelines.mar.sampling import MARPlan, gather_rows


def main() -> None:
    torch.set_num_threads(1)
    pipe = load_default_mar()
    target, draft = pipe.target, pipe.drafter
    torch.manual_seed(0)
    orders = torch.stack([torch.randperm(target.seq_len) for _ in range(4)])
    plan = MARPlan.build(orders, 16, 3.0, "linear")
    num_steps, channels = target.schedule.num_steps, target.token_embed_dim
    plan.draw_noise(torch.Generator().manual_seed(0), channels, num_steps, True, torch.device("cpu"))
    tokens = torch.zeros(4, target.seq_len, channels)
    unknown = torch.ones(4, target.seq_len, dtype=torch.bool)
    labels = torch.arange(4)
    pos = plan.positions[0]
    init, steps = plan.noise_at(pos)
    scale = plan.cfg_of.gather(1, pos).reshape(-1, 1)

    def condition(model):  # [2N, D]: conditional rows, then the null rows
        z = model(tokens, unknown, labels, cfg=True)
        return torch.cat([gather_rows(z[:4], pos), gather_rows(z[4:], pos)])

    def x_1(model, cond):  # every reverse step but the last, from the shared noises
        head, x = model.diffloss, init.clone()
        for i in range(num_steps - 1):
            mean, log_variance = head(x, cond, scale, head.step_index[i : i + 1])
            x = mean + torch.exp(0.5 * log_variance) * steps[i]
        return x

    def last(model, cond, x):
        return model.diffloss(x, cond, scale, model.diffloss.step_index[num_steps - 1 :])

    with torch.no_grad():
        cond_t, cond_d = condition(target), condition(draft)
        x1_d = x_1(draft, cond_d)
        mean_d, log_var_d = last(draft, cond_d, x1_d)
        mean_t_own, _ = last(target, cond_t, x_1(target, cond_t))
        mean_t_aligned, _ = last(target, cond_t, x1_d)
        sigma = torch.exp(0.5 * log_var_d)
        x = mean_d + sigma * torch.randn(mean_d.shape, generator=torch.Generator().manual_seed(1))
        log_ratio = (0.5 * ((x - mean_d) / sigma) ** 2 - 0.5 * ((x - mean_t_aligned) / sigma) ** 2).sum(1)
    print(f"last-step sigma {float(sigma.mean()):.4f}")
    print(f"(a) own trajectories: mean gap {float(((mean_t_own - mean_d).abs() / sigma).mean()):.1f} sigmas")
    print(f"(b) target's last step from the draft's x_1: {float(((mean_t_aligned - mean_d).abs() / sigma).mean()):.2f} "
          f"sigmas, acceptance {float(log_ratio.exp().clamp(max=1).mean()):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
