"""``mmspec methods``: the speculative methods of every pipeline in ``PIPELINES`` and every acceptance
rule, read from the registries (each pipeline class's ``methods``, ``mmspec.rules.ACCEPTANCE_RULES``).
``docs/methods.md`` is this output (a test keeps it current)."""

from __future__ import annotations

import importlib

from ..methods import LOOP_COMMITS
from ..rules import ACCEPTANCE_RULES

#: Pipeline classes whose registries are listed: (title, module, class name).
PIPELINES = (
    ("LlamaGen (AR images)", "mmspec.pipelines.llamagen.pipeline_llamagen", "LlamaGenPipeline"),
    ("VLMs (image-to-text)", "mmspec.pipelines.vlm.pipeline_vlm", "VLMPipeline"),
    ("Language models (text-to-text)", "mmspec.pipelines.lm.pipeline_lm", "LMPipeline"),
    ("MAR (continuous-token AR images)", "mmspec.pipelines.mar.pipeline_mar", "MARPipeline"),
    ("Janus / Janus-Pro (text-to-image)", "mmspec.pipelines.t2i.janus", "JanusImagePipeline"),
    ("Emu3 (text-to-image)", "mmspec.pipelines.t2i.emu3", "Emu3ImagePipeline"),
    ("Block-autoregressive video", "mmspec.pipelines.video.pipeline_video", "VideoPipeline"),
)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("``", "`").replace("|", "\\|")


def methods_markdown() -> str:
    """The registries as Markdown tables (methods per pipeline, then the rules)."""
    lines = [
        "# Methods and acceptance rules",
        "",
        "Generated from the registries by `mmspec methods --markdown`; do not edit by hand.",
        "",
    ]
    for title, module, name in PIPELINES:
        pipeline = getattr(importlib.import_module(module), name)
        lines += [
            f"## {title}: `{name}.methods`",
            "",
            "| `speculative=` | loop | default rule | options (defaults) | needs | lossless | what |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in pipeline.methods:
            options = ", ".join(f"`{k}={v!r}`" for k, v in method.options.items()) or "—"
            needs = ", ".join(f"`{c}`" for c in method.requires) or "—"
            lines.append(
                f"| `{method.name}` | {method.loop} | `{method.default_rule}` | {options} | {needs} | "
                f"{'yes' if method.lossless else 'no'} | {_cell(method.description)} |"
            )
        lines.append("")
    lines += [
        "## Acceptance rules: `mmspec.rules.ACCEPTANCE_RULES`",
        "",
        "| `acceptance=` | commits (loop) | reads | lossless | guarantee |",
        "|---|---|---|---|---|",
    ]
    loops = {commit: loop for loop, commit in LOOP_COMMITS.items()}
    for name in sorted(ACCEPTANCE_RULES):
        rule = ACCEPTANCE_RULES[name]
        view = rule.distribution.__name__ if rule.distribution is not None else "—"
        lines.append(
            f"| `{name}` | {rule.commit.value} ({loops[rule.commit.value]}) | `{view}` | "
            f"{'yes' if rule.lossless else 'no'} | {_cell(rule.bound)} |"
        )
    return "\n".join(lines) + "\n"
