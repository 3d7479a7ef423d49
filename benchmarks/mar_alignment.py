"""Why the embedded MAR pair does not agree under CSpD's exact rule: for the first AR step's tokens
(16 rows, classes 0-15, guidance 3, seed 0, shared noises) compare the last reverse step's Gaussians of
draft and target — (a) each on its own denoising trajectory (what ``speculative="cspd"`` verifies),
(b) the target's last step taken from the draft's x_1 (a variant that only tests the final step;
not exact for the target's law). Prints sigma, the mean gap in sigmas, and (b)'s acceptance.
(c) How close a draft would have to be: the target against itself with its conditions ``z``
perturbed by Gaussian noise of a given relative size (the target's own head, so only the MAE's
output differs, as for a draft that shares the target's head): mean gap and the exact rule's
acceptance for a draw from the perturbed Gaussian.
Run from /tmp: ``python benchmarks/mar_alignment.py``.
"""

from __future__ import annotations

import torch

from mmspec.app.defaults import load_default_mar
from mmspec.pipelines.mar.sampling import MARPlan, gather_rows

ROWS = 16


def main() -> None:
    torch.set_num_threads(1)
    pipe = load_default_mar()
    target, draft = pipe.target, pipe.drafter
    torch.manual_seed(0)
    orders = torch.stack([torch.randperm(target.seq_len) for _ in range(ROWS)])
    plan = MARPlan.build(orders, 16, 3.0, "linear")
    num_steps, channels = target.schedule.num_steps, target.token_embed_dim
    plan.draw_noise(torch.Generator().manual_seed(0), channels, num_steps, True, torch.device("cpu"))
    tokens = torch.zeros(ROWS, target.seq_len, channels)
    unknown = torch.ones(ROWS, target.seq_len, dtype=torch.bool)
    labels = torch.arange(ROWS)
    pos = plan.positions[0]
    init, steps = plan.noise_at(pos)
    scale = plan.cfg_of.gather(1, pos).reshape(-1, 1)

    def condition(model):  # [2N, D]: conditional rows, then the null rows
        z = model(tokens, unknown, labels, cfg=True)
        return torch.cat([gather_rows(z[:ROWS], pos), gather_rows(z[ROWS:], pos)])

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
        mean_t_own, log_var_t = last(target, cond_t, x_1(target, cond_t))
        sigma_t = torch.exp(0.5 * log_var_t)
        mean_t_aligned, _ = last(target, cond_t, x1_d)
        sigma = torch.exp(0.5 * log_var_d)
        x = mean_d + sigma * torch.randn(mean_d.shape, generator=torch.Generator().manual_seed(1))
        log_ratio = (0.5 * ((x - mean_d) / sigma) ** 2 - 0.5 * ((x - mean_t_aligned) / sigma) ** 2).sum(1)
        gaps = {}
        for relative in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
            noise = torch.randn(cond_t.shape, generator=torch.Generator().manual_seed(2))
            cond_p = cond_t + relative * cond_t.norm(dim=1, keepdim=True) / cond_t.shape[1] ** 0.5 * noise
            mean_p, _ = last(target, cond_p, x_1(target, cond_p))
            x = mean_p + sigma_t * torch.randn(mean_p.shape, generator=torch.Generator().manual_seed(3))
            log_ratio_p = (0.5 * ((x - mean_p) / sigma_t) ** 2 - 0.5 * ((x - mean_t_own) / sigma_t) ** 2).sum(1)
            gap = float(((mean_p - mean_t_own).abs() / sigma_t).mean())
            gaps[relative] = (gap, float(log_ratio_p.exp().clamp(max=1).mean()))
    print(f"last-step sigma {float(sigma.mean()):.4f}")
    print(f"(a) own trajectories: mean gap {float(((mean_t_own - mean_d).abs() / sigma).mean()):.1f} sigmas")
    print(f"(b) target's last step from the draft's x_1: {float(((mean_t_aligned - mean_d).abs() / sigma).mean()):.2f} "
          f"sigmas, acceptance {float(log_ratio.exp().clamp(max=1).mean()):.2f}")  # fmt: skip
    for relative, (gap, acceptance) in gaps.items():
        print(f"(c) z perturbed by {relative:.0e} of its norm: mean gap {gap:.2f} sigmas, acceptance {acceptance:.2f}")


if __name__ == "__main__":
    main()
