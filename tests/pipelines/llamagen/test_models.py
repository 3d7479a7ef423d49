"""LlamaGen models without the official fixtures: presets, unseen sizes through the official
checkpoint format, diffusers save/load, and the target contract (CFG halves, caption padding,
uncommitted writes, tree masks, position clamping)."""

from __future__ import annotations

import argparse

import pytest
import torch

from mmspec.pipelines.llamagen import (
    GPT_PRESETS,
    LlamaGenCondition,
    LlamaGenGPT,
    LlamaGenVQ,
    infer_gpt_config,
    llamagen_freqs_2d,
    load_official_gpt,
    load_official_vq,
    resolve_gpt_config,
    resolve_vq_config,
)
from mmspec.types import Target

# Sizes no fixture has: GQA (6 query heads over 3 KV heads), non-default FFN sizing, a 4x4 grid.
UNSEEN_C2I = {
    "dim": 96,
    "n_layer": 3,
    "n_head": 6,
    "n_kv_head": 3,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "vocab_size": 300,
    "block_size": 16,
    "num_classes": 7,
    "model_type": "c2i",
    "cls_token_num": 1,
}
UNSEEN_T2I = {
    "dim": 64,
    "n_layer": 2,
    "n_head": 4,
    "multiple_of": 64,
    "vocab_size": 300,
    "block_size": 16,
    "model_type": "t2i",
    "caption_dim": 24,
    "cls_token_num": 6,
}
# Official training-only ModelArgs fields: must be accepted and ignored by the loader.
TRAINING_ONLY = {
    "token_dropout_p": 0.1,
    "resid_dropout_p": 0.1,
    "ffn_dropout_p": 0.1,
    "drop_path_rate": 0.0,
    "attn_dropout_p": 0.0,
    "max_batch_size": 32,
    "max_seq_len": 2048,
}
TINY_VQ = {
    "codebook_size": 40,
    "codebook_embed_dim": 4,
    "encoder_ch_mult": [1, 2],
    "decoder_ch_mult": [1, 2],
    "z_channels": 32,
    "ch": 32,
    "num_res_blocks": 1,
}


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter (the official init zeroes the LM head, which hides most bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.dim() == 1:
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return model.eval()


def _gpt(config: dict, seed: int) -> LlamaGenGPT:
    return _randomized(LlamaGenGPT(**resolve_gpt_config(config)), seed)


def _labels(model: LlamaGenGPT, batch: int = 2) -> LlamaGenCondition:
    return LlamaGenCondition(class_labels=torch.arange(batch) % model.config.num_classes)


def _captions(model: LlamaGenGPT, valid: tuple[int, ...] = (2, 6)) -> LlamaGenCondition:
    """Left-padded captions with ``valid[b]`` real rows, padded rows exactly zero."""
    gen = torch.Generator().manual_seed(7)
    length = model.cls_token_num
    mask = torch.stack([torch.arange(length) >= length - n for n in valid]).long()
    embs = torch.randn(len(valid), length, model.config.caption_dim, generator=gen) * mask[..., None]
    return LlamaGenCondition(caption_embs=embs, caption_mask=mask)


def _tokens(model: LlamaGenGPT, batch: int = 2, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, model.config.block_size), generator=gen)


def _step_by_step_logits(model: LlamaGenGPT, condition: LlamaGenCondition, tokens: torch.Tensor, cfg: bool):
    """Prefill then single-token decode with a garbage 3-token draft written (never committed)
    before each real token: cond logits ``[B, N, V]`` and uncond logits (or None)."""
    batch, num_tokens = tokens.shape
    cache = model.new_cache(batch, model.max_positions + 3, cfg=cfg)
    out = model.prefill(condition, cache).output
    cond, uncond = [out.logits], [out.uncond_logits]
    for i in range(num_tokens - 1):
        position = model.cls_token_num + i
        junk = (tokens[:, i : i + 3] + 1) % model.vocab_size
        model.forward(junk, position + torch.arange(junk.shape[1]).expand(batch, -1), cache)  # rejected draft
        out = model.forward(tokens[:, i : i + 1], torch.full((batch, 1), position), cache)
        cache.commit(torch.ones(batch, dtype=torch.long))
        cond.append(out.logits)
        uncond.append(out.uncond_logits)
    return torch.cat(cond, 1), None if uncond[0] is None else torch.cat(uncond, 1)


# ------------------------------------------------------------------------------ presets
@pytest.mark.parametrize(
    "preset,params_m", [("GPT-B", 111), ("GPT-L", 343), ("GPT-XL", 775), ("GPT-XXL", 1411), ("GPT-3B", 3097)]
)
def test_gpt_presets_match_official_sizes(preset, params_m):
    """Parameter counts of the official c2i models (gpt.py comments: 111M, 343M, 775M, 1.4B, 3.1B)."""
    config = resolve_gpt_config(preset)
    assert (config["vocab_size"], config["num_classes"], config["cls_token_num"], config["block_size"]) == (
        16384,
        1000,
        1,
        256,
    )
    with torch.device("meta"):
        model = LlamaGenGPT(**config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == params_m


def test_preset_overrides_and_t2i_defaults():
    xl = resolve_gpt_config("GPT-XL", image_size=384)
    assert (xl["dim"], xl["n_layer"], xl["n_head"], xl["block_size"]) == (1280, 36, 20, 576)
    t2i = resolve_gpt_config("GPT-XL", model_type="t2i", image_size=512)
    assert (t2i["cls_token_num"], t2i["caption_dim"], t2i["block_size"]) == (120, 2048, 1024)
    assert resolve_gpt_config({"dim": 64, **TRAINING_ONLY})["dim"] == 64
    assert set(GPT_PRESETS) >= {"GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B"}
    with pytest.raises(ValueError, match="unknown LlamaGen GPT preset"):
        resolve_gpt_config("GPT-XS")
    with pytest.raises(ValueError, match=r"unknown LlamaGen GPT config field\(s\) \['n_heads'\]"):
        resolve_gpt_config("GPT-B", n_heads=8)


@pytest.mark.parametrize("preset,ch_mult,params_m", [("VQ-16", [1, 1, 2, 2, 4], 72), ("VQ-8", [1, 2, 2, 4], 70)])
def test_vq_presets(preset, ch_mult, params_m):
    config = resolve_vq_config(preset)
    assert config["encoder_ch_mult"] == config["decoder_ch_mult"] == ch_mult
    assert (config["codebook_size"], config["codebook_embed_dim"], config["ch"]) == (16384, 8, 128)
    with torch.device("meta"):
        model = LlamaGenVQ(**config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == params_m
    assert model.downsample_factor == 2 ** (len(ch_mult) - 1)
    with pytest.raises(ValueError, match="unknown LlamaGen VQ config field"):
        resolve_vq_config(preset, codebook_dim=4)


# ------------------------------------------------------------------------------ unseen sizes
@pytest.mark.parametrize("config", [UNSEEN_C2I, UNSEEN_T2I], ids=["c2i_gqa", "t2i"])
def test_unseen_sizes_round_trip_through_official_format(tmp_path, config):
    model = _gpt(config, seed=11)
    # The layout official training writes: {"model": ..., "args": Namespace, ...}, DDP prefixes.
    checkpoint = {
        "model": {f"module.{k}": v for k, v in model.state_dict().items()},
        "args": argparse.Namespace(gpt_model="custom"),
        "steps": 10,
    }
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    inferred = infer_gpt_config(model.state_dict())
    assert inferred["dim"] == config["dim"] and inferred["n_layer"] == config["n_layer"]
    assert inferred["model_type"] == config["model_type"] and inferred["vocab_size"] == config["vocab_size"]

    loaded = load_official_gpt(tmp_path / "ckpt.pt", {**config, **TRAINING_ONLY})
    assert dict(loaded.config) == dict(model.config)
    condition = _labels(model) if config["model_type"] == "c2i" else _captions(model)
    tokens = _tokens(model)
    expected = model.teacher_forced_logits(condition, tokens)
    assert torch.equal(loaded.teacher_forced_logits(condition, tokens), expected)
    # Same checkpoint through a preset plus overrides, and a wrong head count is caught.
    overrides = {k: v for k, v in config.items() if k not in ("dim", "n_layer", "n_head")}
    preset = load_official_gpt(
        tmp_path / "ckpt.pt",
        "GPT-B",
        dim=config["dim"],
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        **overrides,
    )
    assert torch.equal(preset.teacher_forced_logits(condition, tokens), expected)
    if config.get("n_kv_head"):
        with pytest.raises(ValueError, match=r"layers\.0\.attention\.wqkv\.weight"):
            load_official_gpt(tmp_path / "ckpt.pt", {**config, "n_kv_head": None})


def test_unseen_vq_round_trip_through_official_format(tmp_path):
    vq = _randomized(LlamaGenVQ(**resolve_vq_config(TINY_VQ)), seed=5)
    torch.save({"model": vq.state_dict()}, tmp_path / "vq.pt")
    loaded = load_official_vq(tmp_path / "vq.pt", {**TINY_VQ, "dropout_p": 0.0, "commit_loss_beta": 0.25})
    indices = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode_code(indices), vq.decode_code(indices))
    assert loaded.decode_code(indices).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"(?s)preset 'VQ-8'.*shape mismatch.*codebook_size=40, codebook_embed_dim=4"):
        load_official_vq(tmp_path / "vq.pt", "VQ-8", ch=32, z_channels=32, num_res_blocks=1)


# ------------------------------------------------------------------------------ save / load
def test_gpt_save_pretrained_round_trip(tmp_path):
    for config, condition_fn in ((UNSEEN_C2I, _labels), (UNSEEN_T2I, _captions)):
        model = _gpt(config, seed=12)
        model.save_pretrained(tmp_path / config["model_type"])
        loaded = LlamaGenGPT.from_pretrained(tmp_path / config["model_type"])
        assert {k: loaded.config[k] for k in model.config} == dict(model.config) and not loaded.training
        condition, tokens = condition_fn(model), _tokens(model)
        assert torch.equal(
            loaded.teacher_forced_logits(condition, tokens), model.teacher_forced_logits(condition, tokens)
        )


def test_vq_save_pretrained_round_trip(tmp_path):
    vq = _randomized(LlamaGenVQ(**resolve_vq_config(TINY_VQ)), seed=6)
    vq.save_pretrained(tmp_path)
    loaded = LlamaGenVQ.from_pretrained(tmp_path)
    assert "quantize.codebook_used" in loaded.state_dict()
    indices = torch.randint(0, 40, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.decode_code(indices), vq.decode_code(indices))
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert torch.equal(loaded.encode(images)[1], vq.encode(images)[1])


# ------------------------------------------------------------------------------ target contract
@pytest.mark.parametrize("config", [UNSEEN_C2I, UNSEEN_T2I], ids=["c2i_gqa", "t2i"])
def test_kv_decode_with_cfg_matches_teacher_forcing(config):
    """Step-by-step decode over a CFG cache (with uncommitted junk drafts in between) equals one
    teacher-forced pass, for the conditional half and for the unconditional twin."""
    model = _gpt(config, seed=13)
    tokens = _tokens(model)
    condition = _labels(model) if config["model_type"] == "c2i" else _captions(model)
    cond, uncond = _step_by_step_logits(model, condition, tokens, cfg=True)
    torch.testing.assert_close(cond, model.teacher_forced_logits(condition, tokens), atol=1e-4, rtol=0)
    if config["model_type"] == "c2i":
        null = LlamaGenCondition(class_labels=torch.full((2,), model.config.num_classes))
    else:  # the unconditional caption keeps its conditional twin's mask
        null = LlamaGenCondition(
            caption_embs=model.cls_embedding.uncond_embedding[: model.cls_token_num].expand(2, -1, -1),
            caption_mask=condition.caption_mask,
        )
    torch.testing.assert_close(uncond, model.teacher_forced_logits(null, tokens), atol=1e-4, rtol=0)
    assert not torch.allclose(cond, uncond, atol=1e-3)


def test_padded_caption_rows_are_invisible():
    model = _gpt(UNSEEN_T2I, seed=14)
    condition, tokens = _captions(model, valid=(2, 5)), _tokens(model)
    noisy = condition.caption_embs + torch.randn(condition.caption_embs.shape) * (1 - condition.caption_mask[..., None])
    changed = LlamaGenCondition(caption_embs=noisy, caption_mask=condition.caption_mask)
    base = model.teacher_forced_logits(condition, tokens)
    torch.testing.assert_close(model.teacher_forced_logits(changed, tokens), base, atol=1e-5, rtol=0)
    unmasked = LlamaGenCondition(caption_embs=condition.caption_embs)  # padding now attended
    assert not torch.allclose(model.teacher_forced_logits(unmasked, tokens), base, atol=1e-4)


def test_prefill_outputs_and_cache_layout():
    model = _gpt(UNSEEN_T2I, seed=15)
    assert isinstance(model, Target)
    cache = model.new_cache(2, model.max_positions, cfg=True)
    assert cache.k.shape == (2, 4, 4, model.max_positions, 16) and cache.groups == 2
    prefill = model.prefill(_captions(model), cache)
    assert prefill.output.logits.shape == (2, 1, 300) and prefill.output.hidden_states.shape == (2, 1, 64)
    assert prefill.output.uncond_logits.shape == (2, 1, 300)
    assert prefill.hidden_states_all.shape == (2, model.cls_token_num, 64)
    assert cache.lengths.tolist() == [model.cls_token_num] * 2
    assert cache.blocked[:, : model.cls_token_num].sum(1).tolist() == [4, 0]
    gqa = _gpt(UNSEEN_C2I, seed=16)
    assert gqa.new_cache(2, 20).k.shape[2] == 3  # n_kv_head KV heads
    with pytest.raises(ValueError, match="class_labels"):
        gqa.prefill(_captions(model), gqa.new_cache(2, 20))
    with pytest.raises(ValueError, match="fewer than the 6 condition positions"):
        model.prefill(_captions(model), model.new_cache(2, 4))


def test_tree_mask_is_used_as_given():
    """Two sibling candidates for the same position: each sees the committed prefix only, so each
    equals the single-token forward of that candidate."""
    model = _gpt(UNSEEN_C2I, seed=17)
    cache = model.new_cache(2, model.max_positions + 2)
    model.prefill(_labels(model), cache)
    candidates = torch.tensor([[5, 9], [7, 2]])
    positions = torch.full((2, 2), model.cls_token_num)
    siblings = torch.eye(2, dtype=torch.bool)
    tree = model.forward(candidates, positions, cache, cache.attention_mask(cache.slots(2), siblings)).logits
    for j in range(2):
        single = model.forward(candidates[:, j : j + 1], positions[:, :1], cache).logits
        torch.testing.assert_close(tree[:, j : j + 1], single, atol=1e-5, rtol=0)


def test_rope_positions_past_the_image_are_clamped():
    table = llamagen_freqs_2d(4, 16, 10000.0, cls_token_num=2)
    assert table.shape == (18, 8, 2)
    positions = torch.tensor([[0, 1, 2, 7, 17, 18, 40]])
    rows = llamagen_freqs_2d(4, 16, 10000.0, 2, positions)
    assert torch.equal(rows[0], table[[0, 1, 2, 7, 17, 17, 17]])
    # Row-major grid: token 5 sits at row 1, column 1; first half of the pairs uses the row.
    angles = torch.atan2(table[2 + 5, :, 1], table[2 + 5, :, 0])
    torch.testing.assert_close(angles[:4], angles[4:])
    # Token 1 (row 0, column 1): no row rotation, a column rotation.
    assert torch.equal(table[2 + 1, :4, 1], torch.zeros(4)) and table[2 + 1, 4, 1] > 0


def test_teacher_forcing_is_differentiable():
    model = _gpt(UNSEEN_T2I, seed=18)
    tokens = _tokens(model)
    with torch.enable_grad():
        logits = model.teacher_forced_logits(_captions(model), tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert model.layers[0].attention.wqkv.weight.grad.abs().sum() > 0
    assert model.cls_embedding.cap_proj.fc1.weight.grad.abs().sum() > 0


def test_bf16_model_keeps_float32_rope_and_logits():
    model = _gpt(UNSEEN_C2I, seed=19)
    tokens, condition = _tokens(model), _labels(model)
    reference = model.teacher_forced_logits(condition, tokens)
    logits = model.to(torch.bfloat16).teacher_forced_logits(condition, tokens)
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().mean() < 0.05 * reference.abs().mean()
