"""Bench suites of the text generators: ``lm`` (a causal LM through :class:`~mmspec.pipelines.lm.LMPipeline`)
and ``vlm`` (a VLM through :class:`~mmspec.pipelines.vlm.VLMPipeline`), each with transformers' own
decoding as peer rows in the same run: ``generate`` (default dynamic cache), prompt lookup
(``prompt_lookup_num_tokens``, ``lm`` only) and assisted generation with the same draft model
(``assistant_model``). Every row runs the same prompts at batch 1, greedy, and is checked token for
token against mmspec's baseline (``tokens_equal_baseline``) and against its peer (``tokens_equal_peer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..loops import GenerationOutput
from ..pipelines.validation import check_int, check_vlm_call
from .bench import BenchCase, BenchSuite, PeerOutput, parse_configs, register_suite, require_folder

#: The ``lm`` suite's prompt sets: "copy" (answers that repeat much of the prompt: prompt lookup's
#: home ground) and "open" (open-ended answers: little to look up).
LM_PROMPTS = {
    "copy": (
        "Repeat the following Python code exactly, then add a docstring to each function:\n\n"
        "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n    return a * b\n\n\n"
        "def power(base, exponent):\n    result = 1\n    for _ in range(exponent):\n"
        "        result = multiply(result, base)\n    return result\n",
        "Fix the spelling mistakes in this paragraph and return the whole corrected paragraph:\n\n"
        "The quick brown fox jumpd over the lazy dog. Then the dog woke up and chased the fox acros the "
        "field, past the old barn and into the forrest, where they both stoped to rest under a tall tree.",
    ),
    "open": (
        "Write a short story about a robot who learns to paint.",
        "Explain why the sky is blue to a ten-year-old.",
    ),
}


def _greedy_peer(hf_model: Any, prompts: list[torch.Tensor], max_new_tokens: int, eos: tuple, pad: int, **kw):
    """A peer's ``run``: transformers ``generate`` on prompt ``part`` (``[1, P]`` ids, one part per prompt),
    greedy, cut at EOS like mmspec's pipelines, as a :class:`PeerOutput`."""

    def run(generator: torch.Generator, profile: bool, part: int) -> PeerOutput:
        ids = prompts[part]
        inputs = ids if isinstance(ids, dict) else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.inference_mode():
            full = hf_model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(eos),
                pad_token_id=pad,
                **kw,
            )
        return _peer_output(full[:, inputs["input_ids"].shape[1] :], max_new_tokens, eos, pad)

    return run


def _peer_output(new: torch.Tensor, max_new_tokens: int, eos: tuple, pad: int) -> PeerOutput:
    """``[1, n]`` generated ids -> a :class:`PeerOutput` padded to ``max_new_tokens``, cut after the first EOS."""
    row = new[0].tolist()
    ends = [i for i, t in enumerate(row) if t in eos]
    length = ends[0] + 1 if ends else len(row)
    tokens = torch.full((1, max_new_tokens), pad, dtype=torch.long)
    tokens[0, :length] = torch.tensor(row[:length], dtype=torch.long)
    return PeerOutput(tokens=tokens, lengths=torch.tensor([length]))


def truncated_hf(model: Any, num_layers: int) -> Any:
    """The HF causal LM ``model`` cut to its first ``num_layers`` blocks, sharing its weight tensors: the
    same draft model as :meth:`~mmspec.pipelines.lm.LMTarget.truncated` (full vocabulary), for assisted
    generation."""
    import copy

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        small = type(model)(config)
    state = {k: v for k, v in model.state_dict().items() if not _beyond_hf(k, num_layers)}
    small.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        small.lm_head.weight = small.model.embed_tokens.weight
    small.model.rotary_emb = model.model.rotary_emb  # its inv_freq buffer is not in the state dict
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval()


def _beyond_hf(key: str, num_layers: int) -> bool:
    parts = key.split(".")
    return len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= num_layers


def _tiny_lm_heads(dim: int) -> tuple[int, int]:
    """The attention and key/value heads of :func:`_tiny_lm` of width ``dim``; a ValueError when ``dim``
    does not split into them."""
    heads, kv_heads = max(dim // 32, 1), max(dim // 64, 1)
    if dim % heads or heads % kv_heads:
        raise ValueError(
            f"dim={dim} does not split into {heads} attention heads sharing {kv_heads} key/value heads: "
            "use e.g. a multiple of 64"
        )
    return heads, kv_heads


def _tiny_lm(vocab_size: int, dim: int, n_layer: int) -> Any:
    """A random Llama-architecture HF causal LM (the ``lm`` suite without ``model=``: per-step costs only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv_heads = _tiny_lm_heads(dim)
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=n_layer,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def _cases_from_configs(
    registry: Any, pipe: Any, configured: list[tuple[str, str, dict, int]] | None, num_draft_tokens: int
) -> list[tuple[str, str, dict, int]]:
    """``(name, method, options, num_draft_tokens)`` per configuration, the options with the method's
    defaults filled in: ``configured`` (from :func:`~mmspec.app.bench.parse_configs`) or every method of
    ``registry`` the pipeline can run with its defaults; each built once, so that option values and
    components are checked before anything runs."""
    if configured is None:
        configured = [(name, name, {}, num_draft_tokens) for name in registry.available(pipe)]
    cases = []
    for spec, name, options, k in configured:
        options = registry.get(name).resolve_options(options)
        registry.get(name).build(pipe, options)
        cases.append((spec, name, options, k))
    return cases


def _assisted_peer(
    name: str,
    hf_model: Any,
    assistant: Any,
    prompts: list,
    max_new_tokens: int,
    eos: tuple,
    pad: int,
    num_tokens: int,
    **config: Any,
) -> BenchCase:
    """A peer case: transformers assisted generation of ``hf_model`` with ``assistant`` drafting up to
    ``num_tokens`` tokens a step (constant schedule; transformers' assistant also stops a draft early
    below its confidence threshold, 0.4 by default). Peers with different numbers may share one
    assistant: its generation config, which transformers reads when it generates, is set before every
    call. ``config``: more to record (the assistant's layers)."""
    run = _greedy_peer(hf_model, prompts, max_new_tokens, eos, pad, assistant_model=assistant)

    def with_tokens(generator: torch.Generator, profile: bool, part: int) -> PeerOutput:
        assistant.generation_config.num_assistant_tokens = num_tokens
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        return run(generator, profile, part)

    record = {"num_assistant_tokens": num_tokens, "schedule": "constant", **config}
    return BenchCase(name, with_tokens, record, peer=True)


def _peer_name(name: str, k: int, num_draft_tokens: int) -> str:
    """A peer row's name; ``k=K`` added when a configuration drafts another number of tokens than the suite's."""
    return name if k == num_draft_tokens else f"{name} k={k}"


@register_suite("lm")
def lm_suite(
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    *,
    model: str | None = None,
    prompts: str = "copy",
    max_new_tokens: int = 128,
    num_draft_tokens: int = 8,
    configs: str | None = None,
    peers: bool = True,
    cpu_packing: bool = True,
    vocab_size: int = 512,
    dim: int = 64,
    n_layer: int = 2,
    prompt_len: int = 64,
) -> BenchSuite:
    """A causal LM: mmspec's baseline and speculative methods (:data:`~mmspec.pipelines.lm.LM_METHODS`)
    against transformers' ``generate``, prompt lookup and assisted generation in the same run.

    ``model``: a local transformers causal-LM folder (Llama, Mistral, Qwen2 ...); its tokenizer's chat
    template wraps the prompt set ``prompts`` ("copy" or "open", :data:`LM_PROMPTS`). Without ``model``, a
    random ``dim`` x ``n_layer`` Llama over ``vocab_size`` ids with prompts repeating a random 16-token
    phrase (``prompt_len`` tokens): per-step costs only, acceptance is not meaningful. ``configs``:
    ``;``-separated ``METHOD[:key=value,...]`` with ``k=`` for ``num_draft_tokens`` (default: every
    available method); an n-gram row's peer is prompt lookup with as many tokens. ``peers``: add the
    transformers rows (batch 1 only: transformers' prompt lookup and assisted generation need it). Each
    draft-model row's peer is assisted generation with the same cut of the target (full vocabulary) and
    up to as many tokens. ``cpu_packing``: the target's linear layers get oneDNN-packed weights for several-row
    forwards (:meth:`~mmspec.pipelines.base.SpeculativePipelineMixin.enable_cpu_packing`; float32 CPU only)."""
    from ..pipelines.lm import LM_METHODS, LMPipeline, LMTarget, load_lm

    # Settings wrong for any model fail before one loads; method option values once it has, before the
    # first case runs.
    if prompts not in LM_PROMPTS:
        raise ValueError(f"prompts must be one of {sorted(LM_PROMPTS)}, got {prompts!r}")
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("num_draft_tokens", num_draft_tokens, 1)
    if model is None:
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("n_layer", n_layer), ("prompt_len", prompt_len)):
            check_int(name, value, 1)
        _tiny_lm_heads(dim)
    else:
        require_folder("model", model)
    configured = None if configs is None else parse_configs(LM_METHODS, configs, num_draft_tokens)
    if model is not None:
        from transformers import AutoTokenizer

        hf, target = load_lm(model, dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(model)
        pipe = LMPipeline(target, tokenizer)
        token_prompts = [pipe.build_prompt(text) for text in LM_PROMPTS[prompts]]
    else:
        from ..types import TokenPrompt

        hf = _tiny_lm(vocab_size, dim, n_layer).to(device, dtype)
        pipe = LMPipeline(LMTarget.from_hf(hf), tokenizer=None)
        gen = torch.Generator().manual_seed(0)
        phrases = [torch.randint(0, vocab_size, (16,), generator=gen) for _ in range(2)]
        token_prompts = [
            TokenPrompt(
                p.repeat((prompt_len + 15) // 16)[None, :prompt_len].to(device),
                torch.tensor([prompt_len], device=device),
            )
            for p in phrases
        ]
    if batch_size > 1:  # batches of the same prompts, row i of a batch = prompt i mod n
        token_prompts = [_batched(token_prompts, batch_size, pipe._pad_token_id())]
    packed = pipe.enable_cpu_packing() if cpu_packing else 0
    eos = pipe.target.eos_token_ids
    pad = pipe._pad_token_id()

    def case(name: str, method: str | None, options: dict, k: int, compare_to: str | None) -> BenchCase:
        def run(generator: torch.Generator, profile: bool, part: int) -> GenerationOutput:
            out = pipe(
                token_prompts[part],
                max_new_tokens=max_new_tokens,
                speculative=method,
                speculative_options=options or None,
                num_draft_tokens=k,
                generator=generator,
                profile=profile,
            )
            return GenerationOutput(out.token_ids, out.lengths, out.stats)

        config = {"method": method, "options": options, "num_draft_tokens": k if method else 0}
        return BenchCase(name, run, config, compare_to=compare_to if peers and batch_size == 1 else None)

    configured = _cases_from_configs(LM_METHODS, pipe, configured, num_draft_tokens)
    cases = [case("baseline (static cache, eager)", None, {}, num_draft_tokens, "transformers generate")]
    # Each n-gram row's peer is prompt lookup with as many tokens, each draft-model row's assisted
    # generation with the same cut of the target and up to as many tokens (:func:`_assisted_peer`).
    lookup_ks = sorted({k for _, m, _, k in configured if m == "ngram"} or {num_draft_tokens})
    assisted = sorted({(o["layers"], k) for _, m, o, k in configured if m == "draft-model"})
    for spec, method, options, k in configured:
        peer = _peer_name("transformers prompt lookup", k, num_draft_tokens) if method == "ngram" else None
        if method == "draft-model":
            peer = _peer_name(f"transformers assisted (first {options['layers']} layers)", k, num_draft_tokens)
        cases.append(case(spec, method, options, k, peer))
    if peers and batch_size == 1:
        ids = [p.tokens[:, : int(p.lengths[0])] for p in token_prompts]
        cases.append(BenchCase("transformers generate", _greedy_peer(hf, ids, max_new_tokens, eos, pad), peer=True))
        for k in lookup_ks:
            lookup = {"prompt_lookup_num_tokens": k}
            cases.append(
                BenchCase(
                    _peer_name("transformers prompt lookup", k, num_draft_tokens),
                    _greedy_peer(hf, ids, max_new_tokens, eos, pad, **lookup),
                    {"generate_kwargs": lookup},
                    peer=True,
                )
            )
        assistants = {layers: truncated_hf(hf, layers) for layers, _ in assisted}
        for layers, k in assisted:
            name = _peer_name(f"transformers assisted (first {layers} layers)", k, num_draft_tokens)
            peer_args = (hf, assistants[layers], ids, max_new_tokens, eos, pad, k)
            cases.append(_assisted_peer(name, *peer_args, assistant_layers=layers))
    return BenchSuite(
        name="lm",
        description=lm_suite.__doc__.split("\n")[0],
        cases=cases,
        parts=len(token_prompts),
        setup={
            "model": model
            or f"random-weight Llama (vocab {vocab_size}, dim {dim}, {n_layer} layers: per-step costs only; "
            "--option model=FOLDER for a real one)",
            "target": dict(vars(pipe.target.decoder.config)),
            "prompts": prompts if model is not None else f"random repeated phrases ({prompt_len} tokens)",
            "num_prompts": len(LM_PROMPTS[prompts]) if model is not None else 2,
            "cpu_packed_layers": packed,
            "dtype": str(dtype),
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "num_draft_tokens": num_draft_tokens,
            "sampling": "greedy",
        },
    )


def _batched(prompts: list, batch_size: int, pad: int) -> Any:
    """One right-padded batch of ``batch_size`` rows cycling through single-row ``prompts``."""
    from ..types import TokenPrompt

    rows = [prompts[i % len(prompts)] for i in range(batch_size)]
    ids = [p.tokens[0, : int(p.lengths[0])].tolist() for p in rows]
    return TokenPrompt.from_lists(ids, pad_id=pad, device=rows[0].tokens.device)


@register_suite("vlm")
def vlm_suite(
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    *,
    model: str | None = None,
    images: str | None = None,
    num_images: int = 8,
    question: str = "Describe the image.",
    max_new_tokens: int = 32,
    num_draft_tokens: int = 4,
    configs: str | None = None,
    peers: bool = True,
    draft_vocab: str = "saved",
    cpu_packing: bool = True,
) -> BenchSuite:
    """A VLM captioning images: mmspec's baseline and methods (:data:`~mmspec.pipelines.vlm.VLM_METHODS`;
    ``model``: the draft VLM in ``MODEL/drafter`` when the folder has one, e.g. the SmolLM2 captioner of
    ``mmspec train-captioner --preset smollm2``) against transformers ``generate`` and assisted generation
    with that draft model, in the same run.

    ``model``: a VLM folder (LLaVA / LLaVA-NeXT / Qwen2-VL families). ``images``: a folder whose first
    ``num_images`` images (sorted by name) are captioned one by one with ``question``. ``configs``:
    ``;``-separated ``METHOD[:key=value,...]`` with ``k=`` for ``num_draft_tokens`` (default: every
    available method). ``draft_vocab``:
    ``"saved"`` scores only the draft model's saved draft vocabulary when its folder has one
    (:data:`~mmspec.training.saved.DRAFT_VOCAB_FILE`), ``"all"`` the whole vocabulary (transformers'
    assisted generation always uses the whole one). ``cpu_packing``: as in the ``lm`` suite (the target
    only: the draft model's steps are one-row)."""
    from ..pipelines.vlm import VLM_METHODS, VLMPipeline, load_vlm_target, vlm_family

    # Settings wrong for any model fail before one loads; those that depend on it (positions, method
    # option values) once it has, before the first case runs.
    if draft_vocab not in ("saved", "all"):
        raise ValueError(f"draft_vocab must be 'saved' or 'all', got {draft_vocab!r}")
    if model is None or images is None:
        raise ValueError("the vlm suite needs --option model=VLM_FOLDER --option images=IMAGE_FOLDER")
    for name, value in (("num_images", num_images), ("max_new_tokens", max_new_tokens)):
        check_int(name, value, 1)
    check_int("num_draft_tokens", num_draft_tokens, 1)
    configured = None if configs is None else parse_configs(VLM_METHODS, configs, num_draft_tokens)
    require_folder("model", model)  # after the settings: a setting wrong for any model is named first
    require_folder("images", images)
    import PIL.Image

    from ..training.saved import CAPTIONER_DRAFTER_SUBFOLDER, captioner_drafter

    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"no .png / .jpg / .webp images in {images}")
    files = files[:num_images]
    from transformers import AutoConfig, AutoProcessor

    def load_hf(path: Path) -> Any:
        family = vlm_family(AutoConfig.from_pretrained(path).model_type)
        return family.hf_class().from_pretrained(path, dtype=dtype).to(device).eval()

    hf = load_hf(Path(model))
    draft_path = Path(model) / CAPTIONER_DRAFTER_SUBFOLDER
    hf_draft = load_hf(draft_path) if (draft_path / "config.json").is_file() else None
    pipe = VLMPipeline(load_vlm_target(hf), AutoProcessor.from_pretrained(model))
    draft = None
    if hf_draft is not None:  # its vision modules become the target's (same weights: the assisted peer is unchanged)
        pipe.drafter = captioner_drafter(load_vlm_target(hf_draft), pipe.target, draft_path, draft_vocab == "saved")
        draft = pipe.drafter.model
    packed = pipe.enable_cpu_packing() if cpu_packing else 0
    pictures = [PIL.Image.open(f).convert("RGB") for f in files]
    prompts = [
        pipe.build_prompt(pictures[i : i + batch_size], [question] * len(pictures[i : i + batch_size]))
        for i in range(0, len(pictures), batch_size)
    ]
    prompt_length = max(int(p.lengths.max()) for p in prompts)
    check_vlm_call(pipe, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, prompt_length=prompt_length)
    for spec, _, _, k in configured or ():
        try:
            check_vlm_call(pipe, max_new_tokens=max_new_tokens, num_draft_tokens=k, prompt_length=prompt_length)
        except ValueError as err:
            raise ValueError(f"config {spec!r}: {err}") from None
    eos = pipe.target.eos_token_ids
    pad = pipe._pad_token_id()

    def case(name: str, method: str | None, options: dict, k: int, compare_to: str | None) -> BenchCase:
        def run(generator: torch.Generator, profile: bool, part: int) -> GenerationOutput:
            out = pipe(
                None,
                prompts[part],
                max_new_tokens=max_new_tokens,
                speculative=method,
                speculative_options=options or None,
                num_draft_tokens=k if method else 0,
                generator=generator,
                profile=profile,
            )
            return GenerationOutput(out.token_ids, out.lengths, out.stats)

        config = {"method": method, "options": options, "num_draft_tokens": k if method else 0}
        return BenchCase(name, run, config, compare_to=compare_to if peers and batch_size == 1 else None)

    configured = _cases_from_configs(VLM_METHODS, pipe, configured, num_draft_tokens)
    cases = [case("baseline (static cache, eager)", None, {}, num_draft_tokens, "transformers generate")]
    for spec, method, options, k in configured:
        peer = _peer_name("transformers assisted (draft model)", k, num_draft_tokens) if method == "model" else None
        cases.append(case(spec, method, options, k, peer))
    if peers and batch_size == 1:
        inputs = [_hf_inputs(p) for p in prompts]  # the very prompts mmspec runs (batch 1: one image each)
        cases.append(BenchCase("transformers generate", _greedy_peer(hf, inputs, max_new_tokens, eos, pad), peer=True))
        if hf_draft is not None:  # the draft model's rows' peer: assisted generation with the same draft model
            for k in sorted({k for _, m, _, k in configured if m == "model"} or {num_draft_tokens}):
                name = _peer_name("transformers assisted (draft model)", k, num_draft_tokens)
                cases.append(_assisted_peer(name, hf, hf_draft, inputs, max_new_tokens, eos, pad, k))
    return BenchSuite(
        name="vlm",
        description=vlm_suite.__doc__.split("\n")[0],
        cases=cases,
        parts=len(prompts),
        setup={
            "model": str(model),
            "draft_model": str(draft_path) if hf_draft is not None else None,
            "draft_vocab_size": None if draft is None or draft.draft_head is None else len(draft.draft_head.ids),
            "draft_shares_vision": draft is not None and draft.vision_modules() == pipe.target.vision_modules(),
            "cpu_packed_layers": packed,
            "images": [str(f) for f in files],
            "question": question,
            "dtype": str(dtype),
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "num_draft_tokens": num_draft_tokens,
            "sampling": "greedy",
        },
    )


def _hf_inputs(prompt: Any) -> dict[str, torch.Tensor]:
    """transformers ``generate`` keyword arguments for a one-row :class:`~mmspec.pipelines.vlm.VLMPrompt`."""
    length = int(prompt.lengths[0])
    inputs = {"input_ids": prompt.tokens[:, :length], "attention_mask": torch.ones_like(prompt.tokens[:, :length])}
    for name in ("pixel_values", "image_sizes", "image_grid_thw"):
        if getattr(prompt, name) is not None:
            inputs[name] = getattr(prompt, name)
    if prompt.mm_token_type_ids is not None:
        inputs["mm_token_type_ids"] = prompt.mm_token_type_ids[:, :length]
    return inputs
