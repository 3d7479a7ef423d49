"""LlamaGenPipeline: diffusers conventions, official reproduction, lossless speculation."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from mmspec.pipelines.llamagen import LlamaGenCondition, LlamaGenVQ
from mmspec.pipelines.llamagen.pipeline_llamagen import LlamaGenPipeline, LlamaGenPipelineOutput
from mmspec.sampling import SamplingConfig, logits_to_probs

from ...conftest import assert_rows_follow, fixtures_dir, tiny_llamagen

FIX = fixtures_dir() / "llamagen"
needs_fixtures = pytest.mark.skipif(not (FIX / "reference.pt").is_file(), reason=f"fixtures not found at {FIX}")


@pytest.fixture(scope="module")
def tiny_pipe():
    gpt, vq = tiny_llamagen()
    draft, _ = tiny_llamagen(dim=16, n_layer=1, seed=1)
    return LlamaGenPipeline(target=gpt, vq=vq, drafter=draft)


@pytest.fixture(scope="module")
def official():
    settings = json.loads((FIX / "settings.json").read_text())
    vq_config = {**settings["vq_model_args"], "ch": settings["vq_encoder_decoder_ch"]}
    c2i = LlamaGenPipeline.from_official(
        str(FIX / "gpt_c2i.pt"), str(FIX / "vq.pt"), settings["gpt_c2i_model_args"], vq_config
    )
    t2i = LlamaGenPipeline(
        target=LlamaGenPipeline.from_official(
            str(FIX / "gpt_t2i.pt"), str(FIX / "vq.pt"), settings["gpt_t2i_model_args"], vq_config
        ).target,
        vq=c2i.vq,
    )
    return settings, torch.load(FIX / "reference.pt", weights_only=True), c2i, t2i


@needs_fixtures
def test_baseline_reproduces_official_generate_runs(official):
    """Same seed as the official generate(): identical token grids (CPU; see fixtures README)."""
    settings, ref, c2i, t2i = official
    for run in settings["c2i_generate"]["runs"]:
        out = c2i(
            class_labels=settings["c2i_generate"]["cond"],
            guidance_scale=run["cfg_scale"],
            temperature=run["temperature"],
            top_k=run["top_k"] or None,
            top_p=run["top_p"],
            generator=torch.Generator().manual_seed(run["seed"]),
            output_type="pt",
        )
        assert torch.equal(out.tokens.flatten(1), ref[f"gen{run['index']}_tokens"].long()), run["name"]
    run = settings["t2i_generate"]
    out = t2i(
        prompt_embeds=ref["t2i_tf_caption"],
        prompt_attention_mask=ref["t2i_tf_emb_masks"],
        guidance_scale=run["cfg_scale"],
        top_k=run["top_k"],
        generator=torch.Generator().manual_seed(run["seed"]),
        output_type="pt",
    )
    assert torch.equal(out.tokens.flatten(1), ref["t2igen_tokens"].long())
    # The decoded image is the official decode of those tokens, mapped from [-1, 1] to [0, 1].
    gen0 = c2i(class_labels=[3, 7], guidance_scale=4.0, generator=torch.Generator().manual_seed(1334), output_type="pt")
    torch.testing.assert_close(gen0.images, ((ref["e2e_gen0_image"] + 1) / 2).clamp(0, 1), atol=5e-4, rtol=0)


@needs_fixtures
@pytest.mark.parametrize("speculative", ["sjd"])
def test_greedy_speculation_equals_greedy_baseline_on_official_model(official, speculative):
    _, _, c2i, _ = official
    base = c2i(class_labels=[3, 7, 1], top_k=1, output_type="pt")
    spec = c2i(class_labels=[3, 7, 1], top_k=1, speculative=speculative, num_draft_tokens=6, output_type="pt")
    assert torch.equal(spec.tokens, base.tokens)
    assert spec.stats.steps <= base.stats.steps


@pytest.mark.parametrize(
    "speculative,acceptance,options",
    [
        ("sjd", "exact", None),
        ("sjd", "greedy", None),
        ("draft-model", "exact", None),
        ("mc-sjd", "exact", None),
        ("mc-sjd", "greedy", {"coupling": "gumbel", "init": "copy"}),
        ("mc-sjd", "exact", {"window": "cost"}),
        ("sjd", "exact", {"coupling": "maximal", "window": "heuristic"}),
        ("draft-model", "exact", {"window": "heuristic"}),
    ],
)
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_speculation_equals_baseline_tiny(tiny_pipe, speculative, acceptance, options, guidance_scale):
    kw = dict(class_labels=[0, 4, 2, 2], guidance_scale=guidance_scale, temperature=0, output_type="pt")
    base = tiny_pipe(**kw)
    spec = tiny_pipe(
        **kw, speculative=speculative, acceptance=acceptance, num_draft_tokens=3, speculative_options=options
    )
    assert torch.equal(spec.tokens, base.tokens)
    if options and "window" in options:
        assert max(spec.stats.draft_widths) <= 3 and len(spec.stats.draft_widths) == spec.stats.steps


def test_cfg_topk_topp_identical_in_draft_and_target(tiny_pipe):
    """Self-drafting with CFG, temperature, top-k and top-p: q == p exactly, so every draft must be
    accepted. Any difference in how the draft applies CFG/filters would reject some."""
    pipe = LlamaGenPipeline(target=tiny_pipe.target, vq=tiny_pipe.vq, drafter=tiny_pipe.target)
    out = pipe(
        class_labels=[1, 3],
        guidance_scale=2.5,
        temperature=0.8,
        top_k=7,
        top_p=0.9,
        speculative="draft-model",
        num_draft_tokens=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    assert out.stats.acceptance_rate_at_depth == [1.0] * 4


def _exact_first_tokens(gpt, label, sampling, n):
    """Exact joint distribution of the first ``n`` image tokens (enumerated with the target)."""
    joint = {}
    for seq in itertools.product(range(gpt.vocab_size), repeat=n):
        cond = LlamaGenCondition(class_labels=torch.tensor([label]))
        cache = gpt.new_cache(1, 16, cfg=sampling.uses_cfg)
        pre = gpt.prefill(cond, cache)
        probs = [logits_to_probs(pre.output.logits[:, -1], sampling, pre.output.uncond_logits[:, -1])]
        if n > 1:
            out = gpt(torch.tensor([seq[:-1]]), cache.slots(n - 1), cache)
            probs += list(logits_to_probs(out.logits, sampling, out.uncond_logits)[0, :, None].unbind(0))
        joint[seq] = math.prod(p[0, t].item() for p, t in zip(probs, seq))
    return joint


@pytest.mark.parametrize("speculative", ["sjd", "draft-model", "mc-sjd"])
def test_exact_sampling_matches_baseline_distribution_with_cfg(speculative):
    """Joint law of the first 3 tokens under CFG + top-k, 12k images in one batch, vs the exact law."""
    gpt, vq = tiny_llamagen(vocab_size=4, grid=2, seed=3, sharpness=1.5)
    draft, _ = tiny_llamagen(vocab_size=4, grid=2, seed=4, dim=16, n_layer=1, sharpness=1.5)
    pipe = LlamaGenPipeline(target=gpt, vq=vq, drafter=draft)
    pipe.set_progress_bar_config(disable=True)
    n, length = 12_000, 3
    sampling = SamplingConfig(temperature=1.0, top_k=3, guidance_scale=2.0)
    out = pipe(
        class_labels=[2] * n,
        guidance_scale=2.0,
        top_k=3,
        speculative=speculative,
        num_draft_tokens=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    exact = _exact_first_tokens(gpt, 2, sampling, length)
    assert_rows_follow(out.tokens.flatten(1)[:, :length], exact)


def test_call_conventions(tiny_pipe):
    kw = dict(class_labels=[1, 2], generator=torch.Generator().manual_seed(5))
    pil = tiny_pipe(**kw)
    assert isinstance(pil, LlamaGenPipelineOutput) and isinstance(pil.images[0], PIL.Image.Image)
    assert pil.images[0].size == (6, 6) and pil.tokens.shape == (2, 3, 3)
    arr = tiny_pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(5), output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 6, 6, 3) and 0 <= arr.min() and arr.max() <= 1
    images, tokens, stats = tiny_pipe(
        **{**kw, "generator": torch.Generator().manual_seed(5)}, output_type="pt", return_dict=False
    )
    assert images.shape == (2, 3, 6, 6) and torch.equal(tokens, pil.tokens) and stats.steps == 8
    # Seeds: same seed same images, batch rows independent of batch composition is NOT promised,
    # but a single-label call equals itself.
    single = tiny_pipe(class_labels=3, generator=torch.Generator().manual_seed(1), output_type="pt")
    again = tiny_pipe(class_labels=[3], generator=torch.Generator().manual_seed(1), output_type="pt")
    assert torch.equal(single.tokens, again.tokens)
    steps = []
    tiny_pipe(class_labels=[0], callback_on_step_end=lambda p, i, t, kw: steps.append(int(kw["num_generated"][0])))
    assert steps[-1] >= 9 and steps == sorted(steps)
    grid = pil.stats.token_source.reshape(2, 3, 3)  # per-position sources for heat-maps
    assert (grid >= 0).all()


def test_save_load_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    loaded = LlamaGenPipeline.from_pretrained(tmp_path)
    kw = dict(class_labels=[0, 1], temperature=0, output_type="pt")
    a, b = tiny_pipe(**kw), loaded(**kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
    assert loaded.drafter is not None


def test_clear_errors(tiny_pipe):
    with pytest.raises(ValueError, match=r"class labels \[7\] are outside \[0, 5\)"):
        tiny_pipe(class_labels=[1, 7])
    with pytest.raises(ValueError, match="pass class_labels"):
        tiny_pipe()
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_pipe(prompt_embeds=torch.zeros(1, 6, 24))
    with pytest.raises(ValueError, match="unknown speculative method 'medusa'"):
        tiny_pipe(class_labels=[0], speculative="medusa")
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        tiny_pipe(class_labels=[0], top_k=2000)
    with pytest.raises(ValueError, match="output_type"):
        tiny_pipe(class_labels=[0], output_type="jpeg")
    other_vq = LlamaGenVQ(
        codebook_size=32,
        codebook_embed_dim=4,
        encoder_ch_mult=(1, 1),
        decoder_ch_mult=(1, 1),
        z_channels=32,
        ch=32,
        num_res_blocks=1,
    )
    with pytest.raises(ValueError, match=r"target vocabulary \(16\) does not match the VQ codebook \(32\)"):
        LlamaGenPipeline(target=tiny_pipe.target, vq=other_vq)
    no_drafter = LlamaGenPipeline(target=tiny_pipe.target, vq=tiny_pipe.vq)
    with pytest.raises(ValueError, match="needs a smaller LlamaGenGPT"):
        no_drafter(class_labels=[0], speculative="draft-model")


def _random_head(gpt, path, target_name=None):
    from mmspec.drafters import EagleConfig, EagleHead
    from mmspec.drafters.eagle import target_fingerprint

    torch.manual_seed(0)
    config = EagleConfig(
        hidden_size=gpt.config.dim,
        n_head=4,
        vocab_size=gpt.vocab_size,
        target_name=target_name or target_fingerprint(gpt.output),
        multiple_of=32,
    )
    EagleHead(config, gpt.tok_embeddings, gpt.output).save_pretrained(path)
    return path


@pytest.mark.parametrize("tree", [None, (3, 2, 6)])
def test_eagle_greedy_equals_baseline_with_cfg(tiny_pipe, tmp_path, tree):
    from mmspec.drafters.eagle import TreeConfig

    pipe = LlamaGenPipeline(target=tiny_pipe.target, vq=tiny_pipe.vq).load_eagle_head(
        _random_head(tiny_pipe.target, tmp_path)
    )
    kw = dict(class_labels=[0, 3, 4], guidance_scale=2.0, temperature=0, output_type="pt")
    options = {"tree": None if tree is None else TreeConfig(*tree)}
    spec = pipe(**kw, speculative="eagle", num_draft_tokens=3, speculative_options=options)
    assert torch.equal(spec.tokens, pipe(**kw).tokens)


def test_eagle_head_for_another_target_is_refused(tiny_pipe, tmp_path):
    other, _ = tiny_llamagen(seed=9)
    path = _random_head(other, tmp_path)
    with pytest.raises(ValueError, match="was trained for target 'sha256:"):
        LlamaGenPipeline(target=tiny_pipe.target, vq=tiny_pipe.vq).load_eagle_head(path)
    with pytest.raises(ValueError, match="needs an EAGLE head"):
        LlamaGenPipeline(target=tiny_pipe.target, vq=tiny_pipe.vq)(class_labels=[0], speculative="eagle")


def test_relaxed_rules_by_name_build_from_the_pipeline(tiny_pipe, tmp_path):
    """LANTERN / GSD given by name get the VQ codebook from the pipeline; with relaxation off they
    reproduce exact acceptance token for token; with it on they accept more and report the TVD."""
    kw = dict(class_labels=[0, 1, 2, 3], guidance_scale=2.0, speculative="sjd", num_draft_tokens=4, output_type="pt")
    exact = tiny_pipe(**kw, generator=torch.Generator().manual_seed(0))
    off = tiny_pipe(
        **kw,
        generator=torch.Generator().manual_seed(0),
        acceptance="lantern",
        acceptance_options={"delta": 0.0, "k": 4, "neighbour_cache": tmp_path},
    )
    assert torch.equal(off.tokens, exact.tokens)
    assert list(tmp_path.glob("*.pt")), "the neighbour table is cached on disk"
    gsd_off = tiny_pipe(
        **kw, generator=torch.Generator().manual_seed(0), acceptance="gsd", acceptance_options={"group_size": 1}
    )
    assert torch.equal(gsd_off.tokens, exact.tokens)
    accepted = {"exact": 0.0, "lantern": 0.0}
    for seed in range(3):
        accepted["exact"] += tiny_pipe(**kw, generator=torch.Generator().manual_seed(seed)).stats.mean_accepted
        on = tiny_pipe(
            **kw,
            generator=torch.Generator().manual_seed(seed),
            acceptance="lantern",
            acceptance_options={"delta": 0.4, "k": 4, "neighbour_cache": tmp_path},
        )
        accepted["lantern"] += on.stats.mean_accepted
        tvd = on.stats.summary()["max_tvd_per_token"]
        assert tvd is not None and tvd <= 0.4 + 1e-6
    assert accepted["lantern"] >= accepted["exact"]
    with pytest.raises(ValueError, match="GSD embedding must be one of"):
        tiny_pipe(class_labels=[0], speculative="sjd", acceptance="gsd", acceptance_options={"embedding": "pixels"})
    # MC-SJD under the relaxed rules: with relaxation off it is exact MC-SJD token for token.
    mc = dict(kw, speculative="mc-sjd")
    for coupling in ("maximal", "gumbel"):
        opts = {"coupling": coupling}
        exact_mc = tiny_pipe(**mc, speculative_options=opts, generator=torch.Generator().manual_seed(0))
        off_mc = tiny_pipe(
            **mc,
            speculative_options=opts,
            generator=torch.Generator().manual_seed(0),
            acceptance="lantern",
            acceptance_options={"delta": 0.0, "k": 4, "neighbour_cache": tmp_path},
        )
        assert torch.equal(off_mc.tokens, exact_mc.tokens)
        on_mc = tiny_pipe(
            **mc,
            speculative_options=opts,
            generator=torch.Generator().manual_seed(0),
            acceptance="gsd",
            acceptance_options={"group_size": 3},
        )
        assert on_mc.stats.summary()["max_tvd_per_token"] is not None


# ------------------------------------------------------------------ the EAGLE head as a pipeline component
def _eagle_pipe(tiny_pipe, tmp_path) -> LlamaGenPipeline:
    return LlamaGenPipeline(target=tiny_pipe.target, vq=tiny_pipe.vq).load_eagle_head(
        _random_head(tiny_pipe.target, tmp_path / "head")
    )


EAGLE_CALL = {
    "class_labels": [0, 3],
    "guidance_scale": 2.0,
    "temperature": 0,
    "output_type": "pt",
    "speculative": "eagle",
    "num_draft_tokens": 3,
}


def test_eagle_head_is_a_registered_component(tiny_pipe, tmp_path):
    from mmspec.pipelines.llamagen import LlamaGenEagleHead

    pipe = _eagle_pipe(tiny_pipe, tmp_path)
    assert isinstance(pipe.components["eagle"], LlamaGenEagleHead) and pipe.eagle_head is pipe.eagle.head
    assert pipe.config.eagle == ("mmspec.pipelines.llamagen.modeling_eagle", "LlamaGenEagleHead")
    # A fresh pipeline (own copies of the models) so that the shared fixture stays float32.
    pipe = LlamaGenPipeline(**{name: copy.deepcopy(model) for name, model in pipe.components.items()})
    assert pipe.eagle_head.target_modules.lm_head is pipe.target.output  # bound to the copy's own target
    pipe.to(dtype=torch.float64)
    assert pipe.eagle_head.fc.weight.dtype == torch.float64 and pipe.eagle.dtype == torch.float64
    assert pipe.eagle_head.target_modules.embed.weight.dtype == torch.float64
    spec = pipe(**EAGLE_CALL)
    assert torch.equal(spec.tokens, pipe(**{**EAGLE_CALL, "speculative": None}).tokens)


def test_eagle_head_save_load_round_trip(tiny_pipe, tmp_path):
    pipe = _eagle_pipe(tiny_pipe, tmp_path)
    pipe.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved" / "eagle").iterdir()} == {"config.json", "model.safetensors"}
    loaded = LlamaGenPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.eagle_head is not None and loaded.eagle_head.target_modules.lm_head is loaded.target.output
    for name, weight in pipe.eagle_head.state_dict().items():
        assert torch.equal(weight, loaded.eagle_head.state_dict()[name]), name
    a, b = pipe(**EAGLE_CALL), loaded(**EAGLE_CALL)
    assert torch.equal(a.tokens, b.tokens) and a.stats.steps == b.stats.steps < 2 * 9
    # The subfolder is the format `mmspec train-drafter` writes: load_eagle_head reads it too.
    again = LlamaGenPipeline(target=loaded.target, vq=loaded.vq).load_eagle_head(tmp_path / "saved" / "eagle")
    assert torch.equal(again(**EAGLE_CALL).tokens, a.tokens)
    # Saved without a head, a pipeline loads without one.
    tiny_pipe.save_pretrained(tmp_path / "plain")
    assert LlamaGenPipeline.from_pretrained(tmp_path / "plain").eagle_head is None


def test_eagle_head_for_another_target_is_refused_at_load(tiny_pipe, tmp_path):
    from mmspec.pipelines.llamagen import LlamaGenEagleHead

    _eagle_pipe(tiny_pipe, tmp_path).save_pretrained(tmp_path / "saved")
    other, _ = tiny_llamagen(seed=9)
    _random_head(other, tmp_path / "saved" / "eagle")  # overwrite the head with one for another target
    with pytest.raises(
        ValueError, match=r"the EAGLE head in .*saved/eagle was trained for target 'sha256:.*not for target 'sha256:"
    ):
        LlamaGenPipeline.from_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="was trained for target"):
        LlamaGenPipeline(
            target=tiny_pipe.target,
            vq=tiny_pipe.vq,
            eagle=LlamaGenEagleHead.from_pretrained(tmp_path / "saved" / "eagle"),
        )
    with pytest.raises(ValueError, match="holds no EAGLE head"):
        LlamaGenEagleHead.from_pretrained(tmp_path / "nowhere")


def test_embedded_model_brings_its_eagle_head():
    from mmspec.app.defaults import default_llamagen_path

    pipe = LlamaGenPipeline.from_pretrained(default_llamagen_path())
    assert pipe.eagle_head is not None and pipe.eagle_head.target_modules.lm_head is pipe.target.output
    assert (
        pipe.eagle_head.config.target_name
        == json.loads((default_llamagen_path() / "eagle" / "config.json").read_text())["target_name"]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eagle_head_moves_to_cuda_and_generates(tiny_pipe, tmp_path):
    pipe = _eagle_pipe(tiny_pipe, tmp_path)
    pipe = LlamaGenPipeline(**{name: copy.deepcopy(model) for name, model in pipe.components.items()}).to("cuda")
    assert pipe.eagle_head.fc.weight.is_cuda and pipe.eagle.device.type == "cuda"
    call = {**EAGLE_CALL, "generator": torch.Generator("cuda").manual_seed(0)}
    spec = pipe(**call)
    assert spec.tokens.is_cuda and torch.equal(spec.tokens, pipe(**{**call, "speculative": None}).tokens)
    # A head loaded into a pipeline already on CUDA lands there too.
    head = _random_head(tiny_pipe.target, tmp_path / "head2")
    fresh = LlamaGenPipeline(target=pipe.target, vq=pipe.vq).load_eagle_head(head)
    assert fresh.eagle_head.fc.weight.is_cuda


def test_draft_model_cache_holds_finished_rows_drafts():
    """A row that finished with the largest overshoot keeps drafting k + 1 tokens while other rows
    go on. The draft model's cache was sized k slots short for condition-prefix targets and this
    batch (embedded model, batch 16, seed 3) wrote past it; it must run, with every row complete."""
    from mmspec.app.defaults import load_default_llamagen

    pipe = load_default_llamagen()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        class_labels=[i % pipe.target.config.num_classes for i in range(16)],
        guidance_scale=3.0,
        speculative="draft-model",
        num_draft_tokens=8,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    )
    assert out.tokens.shape == (16, pipe.target.grid_size, pipe.target.grid_size) and bool((out.tokens >= 0).all())
