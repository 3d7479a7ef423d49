"""How far mmspec's default relaxed rules are from the official LANTERN / LANTERN++ / GSD code, on random
inputs (the numbers in ``docs/relaxed_rules.md``).

    python benchmarks/relaxed_official_tvd.py --out benchmarks/results/relaxed-official-tvd.json
    python benchmarks/relaxed_official_tvd.py --vocab 64 --sigma 1 --lantern-k 10 --lantern-delta 0.3 \
        --out benchmarks/results/relaxed-official-tvd-v64.json

Run it from outside the checkout root or with the package installed (``pip install -e .``). Every
number compares the two variants on the same rows (target ``p``, proposal ``q``, draft token ``x``);
TVD is half the L1 distance. Rows: ``V`` tokens, targets ``softmax(sigma * N(0, 1))``, a synthetic
codebook whose row norms spread over 0.8-1.2 (so raw and L2-normalised neighbour tables differ), plus
the embedded reference model's own codebook for the table comparison.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from mmspec.relaxed import GSDAcceptance, LanternAcceptance, build_latent_neighbours
from mmspec.relaxed_official import (
    gsd_official_accept_prob,
    gsd_official_residual,
    gsd_official_window,
    lantern_official_greedy_pass,
    lantern_official_mass,
    lantern_official_residual,
)


def _tvd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [R, V] x2 -> [R]
    return 0.5 * (a - b).abs().sum(-1)


def _mmspec_residual(relaxed: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p~ - q)) (mmspec's RelaxedAcceptance residual); p~ where it is all zero."""
    residual = (relaxed - q).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(1e-30), relaxed)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean fraction of common ids between the rows of two neighbour tables [V, k]."""
    same = (a.long()[:, :, None] == b.long()[:, None, :]).any(-1).float()
    return float(same.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--sigma", type=float, default=2.0, help="logit scale of the random targets")
    parser.add_argument("--lantern-k", type=int, default=100, help="LANTERN's k (delta mode)")
    parser.add_argument("--lantern-delta", type=float, default=0.1)
    parser.add_argument("--lpp-k", type=int, default=10, help="LANTERN++'s k (multiplicative mode)")
    parser.add_argument("--lpp-lam", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    vocab, rows = args.vocab, args.rows
    codebook = torch.randn(vocab, 8, generator=g)
    codebook = F.normalize(codebook, dim=-1) * (0.8 + 0.4 * torch.rand(vocab, 1, generator=g))
    table = build_latent_neighbours(codebook, vocab - 1)  # raw rows, all neighbours (as the official)
    logits = torch.randn(rows, vocab, generator=g) * args.sigma
    p = logits.softmax(-1)
    q = (torch.randn(rows, vocab, generator=g) * args.sigma + logits).softmax(-1)  # a correlated drafter
    x_det = torch.multinomial(p, 1, generator=g)[:, 0]  # deterministic drafts: x ~ p (q one-hot)
    x_sto = torch.multinomial(q, 1, generator=g)[:, 0]  # stochastic drafts: x ~ q
    one_hot = F.one_hot(x_det, vocab).float()
    results: dict = {"setup": {**vars(args), "codebook_row_norms": [0.8, 1.2], "date": time.strftime("%Y-%m-%d")}}

    # 1. LANTERN (delta = 0.1, k = 100), dynamic tree (deterministic drafts): residual after a rejection.
    k, delta = args.lantern_k, args.lantern_delta
    rule = LanternAcceptance(table, k=k, delta=delta)
    relaxed, _ = rule.relaxed_target(p, x_det, None)
    _, counted = lantern_official_mass(p, x_det, table, k, delta)
    official = lantern_official_residual(p, x_det, None, table, k, counted, "dynamic")
    default = _mmspec_residual(relaxed, one_hot)
    tvd = _tvd(official, default)
    results["lantern_dynamic_residual_tvd"] = {
        "all_rows": float(tvd.mean()),
        "rows_with_a_counted_neighbour": float(tvd[counted].mean()),
        "share_of_rows_with_a_counted_neighbour": float(counted.float().mean()),
        "k": k,
        "delta": delta,
    }

    # 2. LANTERN++ (lambda = 3, k = 10), static tree (stochastic drafts): both official paths.
    k, lam = args.lpp_k, args.lpp_lam
    rule = LanternAcceptance(table, k=k, mode="multiplicative", lam=lam)
    relaxed, _ = rule.relaxed_target(p, x_sto, q)
    _, counted = lantern_official_mass(p, x_sto, table, k, lam - 1, relative=True)
    default = _mmspec_residual(relaxed, q)
    entry = {"k": k, "lam": lam, "share_of_rows_with_a_counted_neighbour": float(counted.float().mean())}
    for path in ("static-llamagen", "static-lumina"):
        tvd = _tvd(lantern_official_residual(p, x_sto, q, table, k, counted, path), default)
        entry[path] = {"all_rows": float(tvd.mean()), "rows_with_a_counted_neighbour": float(tvd[counted].mean())}
    results["lantern_pp_static_residual_tvd"] = entry

    # 3. LANTERN acceptance: official float32 prefix vs mmspec's kernel (float64 prefix).
    mass_official, _ = lantern_official_mass(p, x_det, table, args.lantern_k, args.lantern_delta)
    mass_default = LanternAcceptance(table, k=args.lantern_k, delta=args.lantern_delta).relaxed_target(p, x_det, None)[
        1
    ]
    results["lantern_acceptance_max_abs_diff"] = float((mass_official - mass_default).abs().max())

    # 4. GSD (G = 14, thresholds 0.15 / 0.5 on the synthetic codebook rows): acceptance and residual.
    gsd = GSDAcceptance(codebook, group_size=14, prob_threshold=0.15, dist_threshold=0.5)
    relaxed, _ = gsd.relaxed_target(p, x_sto, q)
    p_x, q_x = p.gather(1, x_sto[:, None])[:, 0], q.gather(1, x_sto[:, None])[:, 0]
    exact = (p_x / q_x).clamp(max=1)
    default_accept = (relaxed.gather(1, x_sto[:, None])[:, 0] / q_x).clamp(max=1)
    official_accept = gsd_official_accept_prob(p, x_sto, q, codebook, 14, 0.15, 0.5)
    official_residual = gsd_official_residual(p, x_sto, q)
    default_residual = _mmspec_residual(relaxed, q)
    window = gsd_official_window(p, x_sto, 14)
    wrapped = (window < 0).all(-1)
    results["gsd"] = {
        "mean_acceptance_default": float(default_accept.mean()),
        "mean_acceptance_official": float(official_accept.mean()),
        "mean_acceptance_exact": float(exact.mean()),
        "share_official_below_exact": float((official_accept < exact - 1e-7).float().mean()),
        "mean_abs_acceptance_diff": float((official_accept - default_accept).abs().mean()),
        "residual_tvd": float(_tvd(official_residual, default_residual).mean()),
        "share_of_drafts_in_the_wrapped_bottom_7": float(wrapped.float().mean()),
        "mean_abs_acceptance_diff_in_the_wrap": float((official_accept - default_accept)[wrapped].abs().mean())
        if bool(wrapped.any())
        else 0.0,
    }
    # The wrap on purpose: drafts at the 7 lowest ranks (uniformly), where the windows differ most.
    low = p.argsort(-1)[torch.arange(rows), torch.arange(rows) % 7]
    official_low = gsd_official_accept_prob(p, low, q, codebook, 14, 0.15, 0.5)
    relaxed_low, _ = gsd.relaxed_target(p, low, q)
    q_low = q.gather(1, low[:, None])[:, 0]
    default_low = (relaxed_low.gather(1, low[:, None])[:, 0] / q_low).clamp(max=1)
    results["gsd"]["bottom_7_drafts"] = {
        "mean_acceptance_default": float(default_low.mean()),
        "mean_acceptance_official": float(official_low.mean()),
        "share_where_they_differ": float(((official_low - default_low).abs() > 1e-6).float().mean()),
    }

    # 5. Neighbour tables: raw vs L2-normalised rows, k = 10.
    raw10, norm10 = build_latent_neighbours(codebook, 10), build_latent_neighbours(codebook, 10, normalize=True)
    tables = {"synthetic_codebook_k10_overlap": _overlap(raw10, norm10)}
    try:
        from mmspec.app.defaults import load_default_llamagen

        weight = load_default_llamagen().vq.quantize.embedding.weight.detach().float()
        norms = weight.norm(dim=-1)
        tables["reference_model_k10_overlap"] = _overlap(
            build_latent_neighbours(weight, 10), build_latent_neighbours(weight, 10, normalize=True)
        )
        tables["reference_model_row_norms"] = [float(norms.min()), float(norms.max())]
    except FileNotFoundError as err:
        tables["reference_model"] = f"not measured: {err}"
    results["neighbour_tables"] = tables

    # 6. Greedy mode (LANTERN's delta and k): official on soft targets vs mmspec's greedy_neighbours = 1.
    near = table[p.argmax(-1), 0].long()  # drafts: the argmax's nearest latent neighbour
    official_pass = lantern_official_greedy_pass(p, near, table, args.lantern_k, args.lantern_delta)
    mmspec_rule = LanternAcceptance(table, k=args.lantern_k, delta=args.lantern_delta, greedy_neighbours=1)
    one_hot_target = F.one_hot(p.argmax(-1), vocab).float()
    mmspec_relaxed, _ = mmspec_rule.relaxed_target(one_hot_target, near, None)
    results["greedy_nearest_neighbour_of_argmax_accepted"] = {
        "official": float(official_pass.float().mean()),
        "mmspec_greedy_neighbours_1": float((mmspec_relaxed.gather(1, near[:, None])[:, 0] == 1).float().mean()),
    }

    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
