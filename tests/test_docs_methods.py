"""docs/methods.md is generated from the registries: it must list exactly what they hold."""

from pathlib import Path

from mmspec.app.cli import main
from mmspec.app.registry_docs import methods_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_methods_doc_is_current():
    assert DOC.read_text(encoding="utf-8") == methods_markdown(), (
        "docs/methods.md is out of date: regenerate it with `mmspec methods --markdown > docs/methods.md`"
    )


def test_methods_command_lists_every_registered_method_and_rule(capsys):
    from mmspec.pipelines.llamagen import LLAMAGEN_METHODS
    from mmspec.pipelines.lm import LM_METHODS
    from mmspec.pipelines.vlm import VLM_METHODS
    from mmspec.rules import ACCEPTANCE_RULES

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in [*LLAMAGEN_METHODS.names(), *VLM_METHODS.names(), *LM_METHODS.names(), *ACCEPTANCE_RULES]:
        assert f"| {name} |" in out, name


def test_every_pipeline_with_a_registry_is_listed():
    """Every exported pipeline class and every generation family's pipeline has its section."""
    from mmspec import _PIPELINES
    from mmspec.app.generators import load_families
    from mmspec.app.registry_docs import PIPELINES

    listed = {name for _, _, name in PIPELINES}
    assert set(_PIPELINES) <= listed, set(_PIPELINES) - listed
    families = {f.pipeline_class for f in load_families().values()}
    assert families <= listed, families - listed
