"""``mmspec bench --suite ar-image``: LlamaGen baseline vs every speculative method, same seeds."""

from __future__ import annotations

import torch

from ..loops import GenerationOutput
from ..pipelines.llamagen.official import GPT_PRESETS
from ..pipelines.llamagen.pipeline_llamagen import LlamaGenPipeline
from ..pipelines.validation import check_int, check_llamagen_call
from ..sampling import SamplingConfig
from .bench import BenchCase, BenchSuite, method_specs, parse_configs, register_suite, require_folder


def _pipeline(source: str, device: torch.device, dtype: torch.dtype, num_classes: int) -> LlamaGenPipeline:
    """``"default"``: the embedded reference model; ``"random:GPT-XL"``: an official size with random
    weights (per-step costs only: acceptance on random weights means nothing); else a saved folder."""
    if source == "default":
        from .defaults import load_default_llamagen

        pipe = load_default_llamagen()
    elif source.startswith("random:"):
        from ..pipelines.llamagen.modeling_gpt import LlamaGenGPT
        from ..pipelines.llamagen.modeling_vq import LlamaGenVQ

        preset = source.split(":", 1)[1]
        if preset not in GPT_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {sorted(GPT_PRESETS)}")
        torch.manual_seed(0)
        gpt = LlamaGenGPT(**{**GPT_PRESETS[preset], "num_classes": num_classes})
        torch.nn.init.normal_(gpt.output.weight, std=0.02)  # the official init zeroes it: uniform logits
        vq = LlamaGenVQ(codebook_size=gpt.config.vocab_size)
        pipe = LlamaGenPipeline(target=gpt, vq=vq)
    else:
        pipe = LlamaGenPipeline.from_pretrained(source)
    pipe.to(device)
    pipe.target.to(dtype)
    if pipe.drafter is not None:
        pipe.drafter.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _describe(source: str) -> str:
    """What ``source`` is, for the record and the table's header."""
    if source == "default":
        from .defaults import default_llamagen_path

        return f"the embedded reference LlamaGen ({default_llamagen_path()})"
    if source.startswith("random:"):
        return f"LlamaGen {source.split(':', 1)[1]} with random weights (per-step costs only)"
    return source


@register_suite("ar-image")
def ar_image_suite(
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    *,
    source: str = "default",
    guidance_scale: float = 3.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_draft_tokens: int = 8,
    acceptance: str | None = None,
    acceptance_options: str = "",
    configs: str | None = None,
    compile: bool = False,
    num_classes: int = 1000,
    num_batches: int = 1,
) -> BenchSuite:
    """LlamaGen class-to-image: the baseline and every registered speculative method the pipeline
    has the components for (``pipe.methods``), on the same class labels and seed; each method with
    ``acceptance`` when that rule fits its loop, else skipped (default: each method's own rule).

    ``acceptance_options``: the rule's options as ``"delta=0.1,k=100"``. ``configs``: instead of every
    method, these configurations, ``;``-separated, each ``METHOD[:key=value,...]`` with the method's
    options (``speculative_options``) and ``k=`` for ``num_draft_tokens``, e.g.
    ``"sjd;mc-sjd;mc-sjd:coupling=gumbel;mc-sjd:window=cost,k=16"``. ``num_batches``: pipeline calls per
    timed run, each a batch of ``batch_size`` images of the next class labels (one generator through
    all of them; the suite's parts, which rounds interleave), so that steps and times average over
    several images instead of one draw."""
    from .jobs import parse_key_values

    # Settings wrong for any model fail before one loads; those that depend on the model (vocabulary,
    # tokens per image) right after, before the first case runs.
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
    check_int("num_draft_tokens", num_draft_tokens, 1)
    if source.startswith("random:"):
        check_int("num_classes", num_classes, 1)
    elif source != "default":
        require_folder("source", source)
    SamplingConfig(temperature=temperature, top_k=top_k, guidance_scale=guidance_scale)
    configured = None if configs is None else parse_configs(LlamaGenPipeline.methods, configs, num_draft_tokens)
    rule_options = parse_key_values([p for p in acceptance_options.split(",") if p], "acceptance_options")
    pipe = _pipeline(source, device, dtype, num_classes)
    classes = pipe.target.config.num_classes
    batches = [[(j * batch_size + i) % classes for i in range(batch_size)] for j in range(num_batches)]
    rule = None if acceptance is None else pipe.acceptance_rule(acceptance, **rule_options)
    specs = method_specs(pipe, configured, num_draft_tokens, rule)
    for _, method, _, k in specs:
        check_llamagen_call(
            pipe,
            batches[0],
            speculative=method,
            num_draft_tokens=k,
            temperature=temperature,
            top_k=top_k,
            guidance_scale=guidance_scale,
        )
    compiled = LlamaGenPipeline(**pipe.components).enable_compile() if compile else None

    def case(name, method, options, k, runner):
        def run(generator: torch.Generator, profile: bool, part: int) -> GenerationOutput:
            labels = batches[part]
            out = runner(
                class_labels=labels,
                guidance_scale=guidance_scale,
                temperature=temperature,
                top_k=top_k,
                generator=generator,
                speculative=method,
                num_draft_tokens=k,
                acceptance=None if method is None else acceptance,
                acceptance_options=rule_options or None if method is not None and acceptance else None,
                speculative_options=options or None,
                output_type="pt",
                profile=profile,
            )
            lengths = torch.full((len(labels),), out.tokens[0].numel())
            return GenerationOutput(tokens=out.tokens.flatten(1), lengths=lengths, stats=out.stats)

        return BenchCase(
            name,
            run,
            {
                "speculative": method,
                "speculative_options": options,
                "num_draft_tokens": k,
                "compiled": runner is compiled,
            },
        )

    cases = [case(f"{name} (eager)", m, o, k, pipe) for name, m, o, k in specs]
    if compiled is not None:
        cases.insert(1, case("baseline (compiled)", None, {}, num_draft_tokens, compiled))
        cases += [case(f"{name} (compiled)", m, o, k, compiled) for name, m, o, k in specs[1:]]
    cfg = pipe.target.config
    return BenchSuite(
        name="ar-image",
        description=ar_image_suite.__doc__.split("\n")[0],
        cases=cases,
        parts=num_batches,
        setup={
            "model": _describe(source),
            "source": source,
            "dim": cfg.dim,
            "n_layer": cfg.n_layer,
            "vocab_size": cfg.vocab_size,
            "tokens_per_image": cfg.block_size,
            "dtype": str(dtype),
            "batch_size": batch_size,
            "num_batches": num_batches,
            "guidance_scale": guidance_scale,
            "temperature": temperature,
            "top_k": top_k,
            "num_draft_tokens": num_draft_tokens,
            "acceptance": acceptance,
            "acceptance_options": rule_options,
        },
    )
