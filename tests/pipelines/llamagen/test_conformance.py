"""Official-format conformance: mmspec's LlamaGen must reproduce the official code's outputs.

The fixtures (``../shared/fixtures/llamagen``, or ``$MMSPEC_FIXTURES/llamagen``) were produced on CPU
with the official FoundationVision/LlamaGen classes; see their README for every setting. Tolerances
are the README's: logits/probs 1e-4 abs, VQ images 5e-4 abs, token ids exact.
"""

from __future__ import annotations

import json

import pytest
import torch

from mmspec.pipelines.llamagen import (
    LlamaGenCondition,
    llamagen_freqs_2d,
    load_official_gpt,
    load_official_vq,
    read_official_state_dict,
)
from mmspec.sampling import SamplingConfig, logits_to_probs, sample_from_probs

from ...conftest import fixtures_dir

FIXTURES = fixtures_dir() / "llamagen"
pytestmark = pytest.mark.skipif(
    not (FIXTURES / "reference.pt").is_file(),
    reason=f"LlamaGen conformance fixtures not found at {FIXTURES} (set MMSPEC_FIXTURES to the fixtures folder)",
)

LOGIT_TOL = 1e-4
IMAGE_TOL = 5e-4


@pytest.fixture(scope="module")
def settings() -> dict:
    return json.loads((FIXTURES / "settings.json").read_text())


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURES / "reference.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def c2i(settings):
    # The full official ModelArgs dict, dropout and max_* fields included (accepted and ignored).
    return load_official_gpt(FIXTURES / "gpt_c2i.pt", settings["gpt_c2i_model_args"])


@pytest.fixture(scope="module")
def t2i(settings):
    return load_official_gpt(FIXTURES / "gpt_t2i.pt", settings["gpt_t2i_model_args"])


@pytest.fixture(scope="module")
def vq(settings):
    return load_official_vq(FIXTURES / "vq.pt", {**settings["vq_model_args"], "ch": settings["vq_encoder_decoder_ch"]})


def _caption(ref) -> LlamaGenCondition:
    return LlamaGenCondition(caption_embs=ref["t2i_tf_caption"], caption_mask=ref["t2i_tf_emb_masks"])


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


# ------------------------------------------------------------------------------ GPT
@pytest.mark.parametrize("key,cls_token_num", [("c2i_freqs_cis", 1), ("t2i_freqs_cis", 120)])
def test_rope_table_matches_official(ref, settings, key, cls_token_num):
    table = llamagen_freqs_2d(settings["grid"], settings["head_dim"], 10000.0, cls_token_num)
    assert table.dtype == torch.float32
    _close(table, ref[key], 1e-6)
    assert not table[:cls_token_num].any(), "condition rows must be all zero (cos = sin = 0)"


def test_c2i_teacher_forced_logits(c2i, ref):
    logits = c2i.teacher_forced_logits(LlamaGenCondition(class_labels=ref["c2i_tf_cond"]), ref["c2i_tf_tokens"])
    _close(logits, ref["c2i_tf_logits"], LOGIT_TOL)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ref["c2i_tf_tokens"].flatten())
    _close(loss, ref["c2i_tf_loss"], LOGIT_TOL)


def test_c2i_null_class_teacher_forced_logits(c2i, ref):
    condition = LlamaGenCondition(class_labels=ref["c2i_tf_null_cond"])
    _close(c2i.teacher_forced_logits(condition, ref["c2i_tf_null_tokens"]), ref["c2i_tf_null_logits"], LOGIT_TOL)


def test_t2i_teacher_forced_logits_with_left_padded_captions(t2i, ref):
    assert (ref["t2i_tf_emb_masks"] == 0).any(), "the fixture must exercise padding"
    logits = t2i.teacher_forced_logits(_caption(ref), ref["t2i_tf_tokens"])
    _close(logits, ref["t2i_tf_logits"], LOGIT_TOL)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ref["t2i_tf_tokens"].flatten())
    _close(loss, ref["t2i_tf_loss"], LOGIT_TOL)


def test_t2i_prefill_then_one_forward_matches_training_logits(t2i, ref):
    tokens = ref["t2i_tf_tokens"]
    batch, num_tokens = tokens.shape
    cache = t2i.new_cache(batch, t2i.max_positions)
    prefill = t2i.prefill(_caption(ref), cache)
    assert prefill.hidden_states_all.shape == (batch, 120, t2i.config.dim)
    positions = 120 + torch.arange(num_tokens - 1).expand(batch, -1)
    rest = t2i.forward(tokens[:, :-1], positions, cache).logits
    _close(torch.cat([prefill.output.logits, rest], dim=1), ref["t2i_tf_logits"], LOGIT_TOL)


# Official generate() runs: (prefix, cfg_scale, temperature, top_k, top_p, model).
GENERATE_RUNS = [
    ("gen0", 4.0, 1.0, 0, 1.0, "c2i"),
    ("gen1", 4.0, 1.0, 20, 1.0, "c2i"),
    ("gen2", 1.0, 0.7, 0, 0.9, "c2i"),
    ("t2igen", 7.5, 1.0, 50, 1.0, "t2i"),
]


@pytest.mark.parametrize("run", GENERATE_RUNS, ids=[r[0] for r in GENERATE_RUNS])
def test_generate_replay_kv_decode(run, ref, settings, request):
    """Recorded tokens through prefill + single-token KV decode: raw logits (cond then uncond rows),
    CFG-combined logits, probabilities, and the sampled tokens from the recorded Exp(1) noise."""
    prefix, cfg_scale, temperature, top_k, top_p, kind = run
    model = request.getfixturevalue(kind)
    condition = _caption(ref) if kind == "t2i" else LlamaGenCondition(class_labels=ref["gen_cond"])
    sampling = SamplingConfig(temperature=temperature, top_k=top_k or None, top_p=top_p, guidance_scale=cfg_scale)
    tokens = ref[f"{prefix}_tokens"].long()
    batch, num_tokens = tokens.shape
    use_cfg = cfg_scale > 1

    cache = model.new_cache(batch, model.max_positions, cfg=use_cfg)
    assert cache.groups == (2 if use_cfg else 1)
    out = model.prefill(condition, cache).output
    for i in range(num_tokens):
        cond, uncond = out.logits[:, -1], None if out.uncond_logits is None else out.uncond_logits[:, -1]
        assert (uncond is not None) == use_cfg
        raw = cond if uncond is None else torch.cat([cond, uncond])
        _close(raw, ref[f"{prefix}_raw_logits"][:, i], LOGIT_TOL)
        combined = cond if uncond is None else uncond + (cond - uncond) * cfg_scale
        _close(combined, ref[f"{prefix}_logits"][:, i], LOGIT_TOL)
        probs = logits_to_probs(cond, sampling, uncond)
        _close(probs, ref[f"{prefix}_probs"][:, i], LOGIT_TOL)
        sampled = sample_from_probs(probs, exp_noise=ref[f"{prefix}_exp_noise"][i])
        assert torch.equal(sampled, tokens[:, i]), f"step {i}: sampled {sampled.tolist()} != {tokens[:, i].tolist()}"
        if i + 1 < num_tokens:  # the last sampled token is never fed back (official)
            positions = torch.full((batch, 1), model.cls_token_num + i)
            out = model.forward(tokens[:, i : i + 1], positions, cache)
            cache.commit(torch.ones(batch, dtype=torch.long))


# ------------------------------------------------------------------------------ VQ
def test_vq_decode_code(vq, ref):
    _close(vq.decode_code(ref["vq_decode_indices"]), ref["vq_decode_out"], IMAGE_TOL)
    grid = vq.decode_code(ref["vq_decode_indices"].view(2, 8, 8))
    _close(grid, ref["vq_decode_out"], IMAGE_TOL)


def test_vq_encode(vq, ref):
    images = ref["vq_encode_images"]
    latent = vq.quant_conv(vq.encoder(images))
    _close(latent, ref["vq_encode_latent"], 1e-4)
    quant, indices = vq.encode(images)
    assert indices.shape == (2, 8, 8)
    flat = indices.flatten()
    robust = ref["vq_encode_margin"] >= 1e-5  # near-ties may legitimately flip
    assert robust.any()
    assert torch.equal(flat[robust], ref["vq_encode_indices"][robust])
    same = (flat == ref["vq_encode_indices"]).view(2, 8, 8)[:, None]
    _close(quant * same, ref["vq_encode_quant"] * same, 1e-5)
    _close(vq.decode(ref["vq_encode_quant"]), ref["vq_encode_recon"], IMAGE_TOL)


def test_vq_end_to_end_generated_image(vq, ref):
    _close(vq.decode_code(ref["gen0_tokens"], 8), ref["e2e_gen0_image"], IMAGE_TOL)


def test_vq_codebook_embeddings_are_normalised_rows(vq):
    rows = vq.codebook_embeddings()
    assert rows.shape == (512, 8)
    _close(rows.norm(dim=-1), torch.ones(512), 1e-5)


# ------------------------------------------------------------------------------ loading
def test_wrong_preset_names_keys_and_shapes():
    with pytest.raises(ValueError) as err:
        load_official_gpt(FIXTURES / "gpt_c2i.pt", "GPT-XL")
    message = str(err.value)
    assert "preset 'GPT-XL'" in message
    assert "tok_embeddings.weight: checkpoint [512, 64] vs config [16384, 1280]" in message
    assert "missing from checkpoint" in message and "layers.2." in message
    assert "dim=64" in message and "n_layer=2" in message and "vocab_size=512" in message


def test_wrong_model_type_lists_unexpected_and_missing(settings):
    config = {**settings["gpt_c2i_model_args"], "model_type": "t2i", "cls_token_num": 120}
    with pytest.raises(ValueError) as err:
        load_official_gpt(FIXTURES / "gpt_c2i.pt", config)
    message = str(err.value)
    assert "unexpected in checkpoint (1): cls_embedding.embedding_table.weight" in message
    assert "cls_embedding.cap_proj.fc1.weight" in message


def test_wrong_vq_width_and_cross_loading(settings):
    with pytest.raises(
        ValueError, match=r"encoder\.conv_in\.weight: checkpoint \[32, 3, 3, 3\] vs config \[128, 3, 3, 3\]"
    ):
        load_official_vq(FIXTURES / "vq.pt", "VQ-16", codebook_size=512)
    with pytest.raises(ValueError, match="VQ tokenizer.*load_official_vq"):
        load_official_gpt(FIXTURES / "vq.pt", "GPT-B")
    with pytest.raises(ValueError, match="LlamaGen GPT.*load_official_gpt"):
        load_official_vq(FIXTURES / "gpt_c2i.pt", "VQ-16")


def test_non_checkpoint_files_are_rejected_clearly():
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_official_gpt(FIXTURES / "settings.json", "GPT-B")
    with pytest.raises(ValueError, match="not a LlamaGen GPT"):
        load_official_gpt(FIXTURES / "reference.pt", "GPT-B")  # a dict of tensors, but not a model


def test_extra_key_is_listed(tmp_path, settings, ref):
    state_dict = read_official_state_dict(FIXTURES / "gpt_c2i.pt")
    torch.save({"model": {**state_dict, "layers.0.attention.bias_extra": torch.zeros(3)}}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected in checkpoint \(1\): layers\.0\.attention\.bias_extra"):
        load_official_gpt(tmp_path / "extra.pt", settings["gpt_c2i_model_args"])


# What official and third-party trainers write: raw FSDP state dicts, DDP/compile prefixes, and
# models saved after setup_caches() (which carry the RoPE table, causal mask and KV caches).
CONTAINER_LAYOUTS = {
    "raw": lambda sd: sd,
    "ddp_prefix": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    "compiled_state_dict_key": lambda sd: {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    "runtime_buffers": lambda sd: {
        "model": {
            **sd,
            "freqs_cis": torch.zeros(65, 8, 2),
            "causal_mask": torch.ones(2, 72, 72),
            "layers.0.attention.kv_cache.k_cache": torch.zeros(1, 4, 72, 16),
        }
    },
}


@pytest.mark.parametrize("layout", list(CONTAINER_LAYOUTS))
def test_container_layouts_load(tmp_path, settings, ref, layout):
    state_dict = read_official_state_dict(FIXTURES / "gpt_c2i.pt")
    torch.save(CONTAINER_LAYOUTS[layout](state_dict), tmp_path / "ckpt.pt")
    model = load_official_gpt(tmp_path / "ckpt.pt", settings["gpt_c2i_model_args"])
    condition = LlamaGenCondition(class_labels=ref["c2i_tf_null_cond"])
    _close(model.teacher_forced_logits(condition, ref["c2i_tf_null_tokens"]), ref["c2i_tf_null_logits"], LOGIT_TOL)
