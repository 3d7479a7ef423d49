"""``mmspec bench --suite t2i --option model=FOLDER``: a Janus / Emu3 text-to-image folder, the baseline
vs every speculative method it can run (SJD, MC-SJD, EAGLE with a head), same prompts and seed."""

from __future__ import annotations

import torch

from ..loops import GenerationOutput
from ..pipelines.t2i import T2IPipeline
from ..pipelines.validation import check_int
from ..sampling import SamplingConfig
from ..training.t2i import parse_grid
from .bench import BenchCase, BenchSuite, method_specs, parse_configs, register_suite, require_folder


@register_suite("t2i")
def t2i_suite(
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    *,
    model: str | None = None,
    prompt: str = "a red apple on a wooden table",
    input_ids: str | None = None,
    grid: str | None = None,
    eagle_head: str | None = None,
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_draft_tokens: int = 8,
    acceptance: str | None = None,
    configs: str | None = None,
) -> BenchSuite:
    """Janus / Emu3 text-to-image: the baseline and every registered method of the folder's pipeline.

    ``model``: a local folder (a saved JanusImagePipeline / Emu3ImagePipeline, or the transformers
    model; an EAGLE head in its ``eagle/`` is used); ``prompt``: the text of every row (needs the
    folder's processor), or ``input_ids``: one whole prompt as space-separated token ids (Janus: ending
    with the begin-of-image token; Emu3 then runs without CFG unless the folder has a processor);
    ``grid``: Emu3's token grid ``HxW`` when the folder does not record it; ``eagle_head``: a head
    folder to attach; ``configs``: as the ar-image suite's (``"sjd;mc-sjd:coupling=gumbel,k=16"``)."""
    if model is None:
        raise ValueError("the t2i suite needs --option model=FOLDER (a Janus or Emu3 folder)")
    require_folder("model", model)
    # Settings wrong for any model fail before one loads; the vocabulary and the methods (Janus and Emu3
    # have their own) are checked once it has loaded, before the first case runs.
    check_int("num_draft_tokens", num_draft_tokens, 1)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, guidance_scale=guidance_scale)
    size = {} if grid is None else dict(zip(("height", "width"), parse_grid(grid)))
    pipe = T2IPipeline.from_pretrained(model, torch_dtype=dtype, **size).to(device)
    sampling.validate_vocab(pipe.target.vocab_size)
    configured = None if configs is None else parse_configs(pipe.methods, configs, num_draft_tokens)
    pipe.set_progress_bar_config(disable=True)
    if eagle_head is not None:
        pipe.load_eagle_head(eagle_head)
    if input_ids is not None:
        ids = torch.tensor([[int(t) for t in input_ids.split()]] * batch_size)
        inputs = {"input_ids": ids}
        if pipe.model_type == "emu3" and guidance_scale > 1:
            raise ValueError("Emu3 with input_ids has no negative prompt: pass guidance_scale=1 or a prompt")
    else:
        inputs = {"prompt": [prompt] * batch_size}
    rule = None if acceptance is None else pipe.acceptance_rule(acceptance)

    def case(name, method, options, k):
        def run(generator: torch.Generator, profile: bool, part: int) -> GenerationOutput:
            # the whole input is one call: the suite has one part, ``part`` is 0
            out = pipe(
                **inputs,
                guidance_scale=guidance_scale,
                temperature=temperature,
                top_k=top_k,
                generator=generator,
                speculative=method,
                num_draft_tokens=k,
                acceptance=None if method is None else rule,
                speculative_options=options or None,
                output_type="tokens",
                profile=profile,
            )
            tokens = out.tokens.flatten(1)
            return GenerationOutput(tokens=tokens, lengths=torch.full((batch_size,), tokens.shape[1]), stats=out.stats)

        return BenchCase(name, run, {"speculative": method, "speculative_options": options, "num_draft_tokens": k})

    config = pipe.target.decoder.config
    return BenchSuite(
        name="t2i",
        description=t2i_suite.__doc__.split("\n")[0],
        cases=[case(*spec) for spec in method_specs(pipe, configured, num_draft_tokens, rule)],
        setup={
            "model": model,
            "pipeline": type(pipe).__name__,
            "dim": config.dim,
            "n_layer": config.n_layer,
            "image_vocab_size": pipe.target.vocab_size,
            "tokens_per_image": pipe.target.num_tokens,
            "eagle_head": pipe.eagle is not None,
            "dtype": str(dtype),
            "batch_size": batch_size,
            "guidance_scale": guidance_scale,
            "temperature": temperature,
            "top_k": top_k,
            "num_draft_tokens": num_draft_tokens,
            "acceptance": acceptance,
        },
    )
