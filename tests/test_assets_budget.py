"""The embedded models (``mmspec/assets``, shipped in the wheel) stay within their 40 MB budget."""

from __future__ import annotations

from mmspec.app.generators import assets_dir

BUDGET_BYTES = 40 * 10**6


def test_embedded_models_fit_the_budget():
    models = [path for path in assets_dir().iterdir() if path.is_dir()]
    assert len(models) >= 4, f"expected the LlamaGen, captioner, MAR and video models, found {models}"
    total = sum(path.stat().st_size for path in assets_dir().rglob("*") if path.is_file())
    assert total <= BUDGET_BYTES, (
        f"embedded models take {total / 1e6:.1f} MB, over the {BUDGET_BYTES / 1e6:.0f} MB budget"
    )
