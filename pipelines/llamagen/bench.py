"""``mmspec bench --suite ar-image``: LlamaGen baseline vs every speculative method, same seeds."""

from __future__ import annotations

import torch

from mmspec.bench import BenchCase, BenchSuite, register_suite
from mmspec.loop import GenerationOutput

from .official import GPT_PRESETS
from .pipeline_llamagen import SPECULATIVE_METHODS, LlamaGenPipeline, SpeculativeOptions


def _pipeline(source: str, device: torch.device, dtype: torch.dtype, num_classes: int) -> LlamaGenPipeline:
    """``"default"``: the embedded reference model; ``"random:GPT-XL"``: an official size with random
    weights (per-step costs only: acceptance on random weights means nothing); else a saved folder."""
    if source == "default":
        from mmspec.defaults import load_default_llamagen

        pipe = load_default_llamagen()
    elif source.startswith("random:"):
        from .modeling_gpt import LlamaGenGPT
        from .modeling_vq import LlamaGenVQ

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


@register_suite("ar-image")
def ar_image_suite(device: torch.device, dtype: torch.dtype, batch_size: int = 1, *, source: str = "default",
                   guidance_scale: float = 3.0, temperature: float = 1.0, top_k: int | None = None,
                   num_draft_tokens: int = 8, acceptance: str = "exact", compile: bool = False,
                   num_classes: int = 1000) -> BenchSuite:
    """LlamaGen class-to-image: the baseline and each speculative method the pipeline can build,
    on the same class labels and seed (sampling with the given rule)."""
    pipe = _pipeline(source, device, dtype, num_classes)
    labels = [i % pipe.target.config.num_classes for i in range(batch_size)]
    methods = [None]
    for name, factory in SPECULATIVE_METHODS.items():
        try:
            factory(pipe, SpeculativeOptions())
        except ValueError:  # e.g. no drafter component for this method
            continue
        methods.append(name)
    compiled = LlamaGenPipeline(**pipe.components).enable_compile() if compile else None

    def case(name, method, runner):
        def run(generator: torch.Generator, profile: bool) -> GenerationOutput:
            out = runner(class_labels=labels, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                         generator=generator, speculative=method, num_draft_tokens=num_draft_tokens,
                         acceptance=acceptance, output_type="pt")
            return GenerationOutput(tokens=out.tokens.flatten(1), lengths=torch.full((len(labels),), out.tokens[0].numel()),
                                    stats=out.stats)
        return BenchCase(name, run, {"speculative": method, "compiled": runner is compiled})

    cases = [case(f"{m or 'baseline'} (eager)", m, pipe) for m in methods]
    if compiled is not None:
        cases.insert(1, case("baseline (compiled)", None, compiled))
        cases += [case(f"{m} (compiled)", m, compiled) for m in methods[1:]]
    cfg = pipe.target.config
    return BenchSuite(
        name="ar-image",
        description=ar_image_suite.__doc__.split("\n")[0],
        cases=cases,
        setup={"source": source, "dim": cfg.dim, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
               "tokens_per_image": cfg.block_size, "dtype": str(dtype), "batch_size": batch_size,
               "guidance_scale": guidance_scale, "temperature": temperature, "top_k": top_k,
               "num_draft_tokens": num_draft_tokens, "acceptance": acceptance},
    )
