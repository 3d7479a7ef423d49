"""Acceptance rate per draft depth of SJD and MC-SJD on the embedded reference LlamaGen model (16 images,
batch 1, 16 drafts per step, guidance 3, temperature 1): where the coupling helps and where it cannot.

    cd /tmp && python /path/to/benchmarks/mcsjd_acceptance_by_depth.py
"""

import torch

from mmspec.app.defaults import load_default_llamagen

torch.set_num_threads(1)
pipe = load_default_llamagen()
pipe.set_progress_bar_config(disable=True)
for name, method, options in [
    ("sjd", "sjd", {}),
    ("mc-sjd maximal", "mc-sjd", {}),
    ("mc-sjd gumbel", "mc-sjd", {"coupling": "gumbel"}),
]:
    accepted, reached = torch.zeros(16), torch.zeros(16)
    for seed in range(16):
        out = pipe(
            class_labels=[seed],
            guidance_scale=3.0,
            speculative=method,
            speculative_options=options or None,
            num_draft_tokens=16,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        )
        accepted += out.stats.accepted_at_depth.float()
        reached += out.stats.proposed_at_depth.float()
    rates = [round(float(a / r), 2) if r else None for a, r in zip(accepted[:8], reached[:8])]
    print(f"{name}: P(kept | reached) at depths 1..8 = {rates}")
