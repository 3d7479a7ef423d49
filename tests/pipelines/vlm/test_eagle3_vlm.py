"""EAGLE-3 drafters for VLM targets and the vLLM / SGLang on-disk format.

* chains and EAGLE-2 trees are lossless on the four tiny families (M-RoPE for Qwen), and a briefly
  trained head saves target steps;
* export -> import gives identical drafts; an independent reference forward written from the
  engines' published semantics (key names, ``fc`` on the three concatenated layers, 2H-input
  attention with HF's half-split RoPE, ``d2t`` offsets, each engine's layer-id reading) reproduces
  mmspec's first proposal from the exported files alone, for both layer-id conventions, and for a
  directory built by hand;
* drafts for another vocabulary / hidden size / target type / RoPE kind are refused.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmspec.drafters.eagle import TreeConfig
from mmspec.drafters.eagle3 import Eagle3Drafter
from mmspec.drafters.eagle3_format import read_eagle3, target_spec, write_eagle3
from mmspec.pipelines.vlm import VLMPipeline, load_vlm_target
from mmspec.pipelines.vlm.eagle3 import eagle3_head_for_vlm, load_eagle3_drafter
from mmspec.sampling import SamplingConfig
from mmspec.training.eagle3 import Eagle3TrainConfig, train_eagle3_head
from mmspec.training.vlm import distilled_batches, vlm_prompt_sampler

from .test_hf_parity import _Recorder, _reply
from .test_vlm import CASES, FAMILIES, _chat, hf_greedy, image, tiny_vlm

QUESTION = "describe the image"


def _pipe(family: str) -> VLMPipeline:
    model, processor = tiny_vlm(family)
    return VLMPipeline(load_vlm_target(model), processor)


def _random_head(target, draft_vocab: int = 40, seed: int = 0):
    torch.manual_seed(seed)
    head = eagle3_head_for_vlm(target, draft_vocab_size=draft_vocab, aux_layer_ids=(0, 1, 0))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(
                torch.randn(p.shape) * (p[0].numel() ** -0.5 if p.dim() >= 2 else 0.1) + (1.0 if p.dim() == 1 else 0.0)
            )
    ids = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
    head.set_draft_vocab(ids)
    return head.eval()


@pytest.mark.parametrize("tree", [None, TreeConfig(depth=3, top_k=2, total_nodes=5)], ids=["chain", "tree"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_eagle3_equals_generate(family, tree):
    pipe = _pipe(family)
    images, prompts = CASES["batch"]
    drafter = Eagle3Drafter(_random_head(pipe.target), tree)
    out = pipe(images, prompts, max_new_tokens=12, drafter=drafter, num_draft_tokens=3)
    for row, entry in enumerate(images):
        row_images = entry if isinstance(entry, list) else [entry]
        n = int(out.lengths[row])
        assert out.token_ids[row, :n].tolist() == hf_greedy(family, row_images, prompts[row], 12)


@pytest.fixture(scope="module")
def trained_qwen():
    """Qwen2.5-VL (M-RoPE) target and an EAGLE-3 head trained by online distillation (40 steps)."""
    pipe = _pipe("qwen2_5_vl")
    head = eagle3_head_for_vlm(pipe.target, draft_vocab_size=48)
    config = Eagle3TrainConfig(
        steps=40, batch_size=4, seq_len=12, lr=3e-3, ttt_steps=2, vocab_batches=4, progress=False
    )
    items = [(image(i), q) for i in range(4) for q in (QUESTION, "what is in this picture")]
    batches = distilled_batches(pipe.target, vlm_prompt_sampler(pipe, items, 4), config, SamplingConfig(temperature=0))
    losses = train_eagle3_head(pipe.target, head, batches, config)
    assert losses[-1] < losses[0]
    return pipe, head.eval()


def test_trained_vlm_head_saves_steps_through_the_method_registry(trained_qwen, tmp_path):
    pipe, head = trained_qwen
    Eagle3Drafter(head).save_pretrained(tmp_path)
    base = pipe(image(1), QUESTION, max_new_tokens=12, num_draft_tokens=0)
    spec = pipe(
        image(1),
        QUESTION,
        max_new_tokens=12,
        speculative="eagle3",
        speculative_options={"path": str(tmp_path)},
        num_draft_tokens=3,
    )
    assert _reply(spec) == _reply(base) and spec.stats.steps < base.stats.steps


def test_export_then_import_gives_identical_drafts(trained_qwen, tmp_path):
    pipe, head = trained_qwen
    write_eagle3(head, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    c = head.config
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert (config["vocab_size"], config["draft_vocab_size"], config["target_hidden_size"]) == (96, 48, 32)
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(c.aux_layer_ids)
    assert config["max_position_embeddings"] >= 512  # the target's context
    assert config["target_model_type"] == "qwen2_5_vl" and config["rope_scaling"]["mrope_section"] == [2, 1, 1]
    assert tensors["fc.weight"].shape == (32, 96) and tensors["lm_head.weight"].shape == (48, 32)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (32, 64)  # 2H inputs
    assert "midlayer.hidden_norm.weight" in tensors and "embed_tokens.weight" not in tensors
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool and tensors["t2d"].shape == (96,)
    assert torch.equal(torch.arange(48) + tensors["d2t"], tensors["t2d"].nonzero().flatten())
    imported = load_eagle3_drafter(tmp_path / "out", pipe.target)
    drafts = []
    for drafter in (Eagle3Drafter(head), imported):
        recorder = _Recorder(drafter)
        out = pipe(image(2), QUESTION, max_new_tokens=12, drafter=recorder, num_draft_tokens=3)
        drafts.append((torch.cat(recorder.drafts, 1), out.token_ids))
    assert torch.equal(drafts[0][0], drafts[1][0]) and torch.equal(drafts[0][1], drafts[1][1])


# --------------------------------------------------------------------------- reference from the files


def _hf_layer_outputs(model, batch) -> list[torch.Tensor]:
    """Each HF text-decoder layer's output ``[1, P, H]`` (forward hooks on transformers' own modules)."""
    outputs = []
    layers = model.model.language_model.layers
    hooks = [
        layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def reference_chain(
    directory, engine: str, embed: torch.Tensor, layer_outputs: list[torch.Tensor], tokens: list[int], k: int
):
    """Greedy EAGLE-3 chain from the files alone, read as ``engine`` ("sglang": id = output of layer
    id; "vllm": id = the state entering layer id). ``tokens``: prompt + the target's first token
    (1-D RoPE positions 0, 1, ...). Returns ``k`` target ids."""
    cfg = json.loads((directory / "config.json").read_text())
    w = load_file(directory / "model.safetensors")
    ids = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    layers = [i if engine == "sglang" else i - 1 for i in ids]
    eps, heads, kv = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads

    def rms(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name]

    def rope(x, pos):  # x [T, h, d]; HF rotate_half layout
        inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
        ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[:, None]
        rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * ang.cos() + rot * ang.sin()

    prompt_len = len(tokens) - 1
    aux = torch.cat([layer_outputs[i][0, :prompt_len] for i in layers], -1)  # [P, 3H_t]
    hidden = aux @ w["fc.weight"].T  # g_t
    inputs = torch.tensor(tokens[1:])  # x_{t+1}
    positions = torch.arange(prompt_len).float()
    keys, values, out_tokens = [], [], []
    for _ in range(k):
        e = embed[inputs]
        x = torch.cat([rms(e, "midlayer.input_layernorm.weight"), rms(hidden, "midlayer.hidden_norm.weight")], -1)
        q = rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(len(x), heads, d), positions)
        kk = rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(len(x), kv, d), positions)
        vv = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(len(x), kv, d)
        keys.append(kk), values.append(vv)
        K = torch.cat(keys).repeat_interleave(heads // kv, 1)
        V = torch.cat(values).repeat_interleave(heads // kv, 1)
        total = K.shape[0]
        query_pos = torch.arange(total - len(x), total)
        mask = torch.arange(total)[None] <= query_pos[:, None]
        att = torch.einsum("thd,shd->hts", q, K) / d**0.5
        att = att.masked_fill(~mask[None], float("-inf")).softmax(-1)
        o = torch.einsum("hts,shd->thd", att, V).reshape(len(x), heads * d) @ w["midlayer.self_attn.o_proj.weight"].T
        h = hidden + o
        h = (
            h
            + (
                F.silu(rms(h, "midlayer.post_attention_layernorm.weight") @ w["midlayer.mlp.gate_proj.weight"].T)
                * (rms(h, "midlayer.post_attention_layernorm.weight") @ w["midlayer.mlp.up_proj.weight"].T)
            )
            @ w["midlayer.mlp.down_proj.weight"].T
        )
        last = h[-1:]
        draft_id = int((rms(last, "norm.weight") @ w["lm_head.weight"].T).argmax())
        target_id = draft_id + int(w["d2t"][draft_id])  # d2t offsets
        out_tokens.append(target_id)
        hidden, inputs, positions = last, torch.tensor([target_id]), positions[-1:] + 1
    return out_tokens


def _first_proposal(pipe, drafter, picture, k: int):
    recorder = _Recorder(drafter)
    out = pipe(picture, QUESTION, max_new_tokens=6, drafter=recorder, num_draft_tokens=k)
    return recorder.drafts[0][0].tolist(), out


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_reference_forward_from_the_exported_files_reproduces_the_drafts(tmp_path, engine):
    pipe = _pipe("llava")
    model, processor = tiny_vlm("llava")
    head = _random_head(pipe.target, seed=3)
    write_eagle3(head, tmp_path, layer_convention=engine)
    ids = json.loads((tmp_path / "config.json").read_text())["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert ids == [i + (engine == "vllm") for i in head.config.aux_layer_ids]  # the convention, as written
    picture, k = image(4), 3
    mine, out = _first_proposal(pipe, Eagle3Drafter(head), picture, k)
    batch = processor(images=[picture], text=[_chat(processor, [picture], QUESTION)], return_tensors="pt")
    prompt = batch["input_ids"][0].tolist()
    tokens = prompt + [int(out.token_ids[0, 0])]
    embed = model.get_input_embeddings().weight.detach()
    ref = reference_chain(tmp_path, engine, embed, _hf_layer_outputs(model, batch), tokens, k)
    assert mine == ref


def test_hand_built_directory_loads_and_drafts_as_the_reference(tmp_path):
    """A draft written by hand in the engines' layout (as SpecForge would ship one, no mmspec record)."""
    pipe = _pipe("llava")
    model, processor = tiny_vlm("llava")
    H, V, Vd, heads, kv, d, inter = 32, 96, 20, 4, 2, 8, 40
    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=g) * shape[-1] ** -0.5  # noqa: E731
    ids = torch.randperm(V, generator=g)[:Vd].sort().values
    tensors = {
        "fc.weight": r(H, 3 * H),
        "midlayer.hidden_norm.weight": 1 + 0.1 * r(H),
        "midlayer.input_layernorm.weight": 1 + 0.1 * r(H),
        "midlayer.self_attn.q_proj.weight": r(heads * d, 2 * H),
        "midlayer.self_attn.k_proj.weight": r(kv * d, 2 * H),
        "midlayer.self_attn.v_proj.weight": r(kv * d, 2 * H),
        "midlayer.self_attn.o_proj.weight": r(H, heads * d),
        "midlayer.post_attention_layernorm.weight": 1 + 0.1 * r(H),
        "midlayer.mlp.gate_proj.weight": r(inter, H),
        "midlayer.mlp.up_proj.weight": r(inter, H),
        "midlayer.mlp.down_proj.weight": r(H, inter),
        "norm.weight": 1 + 0.1 * r(H),
        "lm_head.weight": 3 * r(Vd, H),
        "d2t": ids - torch.arange(Vd),
        "t2d": torch.zeros(V, dtype=torch.bool).index_fill(0, ids, True),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": H,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": V,
        "draft_vocab_size": Vd,
        "target_hidden_size": H,
        "tie_word_embeddings": False,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 0], "use_aux_hidden_state": True},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    drafter = load_eagle3_drafter(tmp_path, pipe.target)  # SGLang/SpecForge reading: outputs of layers 0, 1, 0
    assert drafter.head.config.aux_layer_ids == (0, 1, 0)
    picture, k = image(5), 3
    mine, out = _first_proposal(pipe, drafter, picture, k)
    batch = processor(images=[picture], text=[_chat(processor, [picture], QUESTION)], return_tensors="pt")
    tokens = batch["input_ids"][0].tolist() + [int(out.token_ids[0, 0])]
    ref = reference_chain(
        tmp_path, "sglang", model.get_input_embeddings().weight.detach(), _hf_layer_outputs(model, batch), tokens, k
    )
    assert mine == ref
    assert all(int(t) in ids.tolist() for t in mine)  # drafts come from the draft vocabulary
    # The same file read with vLLM's convention names other layers (id - 1): refused when out of range.
    with pytest.raises(ValueError, match="must name layers of the target"):
        load_eagle3_drafter(tmp_path, pipe.target, layer_convention="vllm")


def test_mismatched_drafts_are_refused(tmp_path):
    pipe = _pipe("llava")
    head = _random_head(pipe.target)
    write_eagle3(head, tmp_path)
    spec = target_spec(pipe.target)
    cfg = json.loads((tmp_path / "config.json").read_text())

    def edited(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))

    edited(vocab_size=100)
    with pytest.raises(ValueError, match=r"made for another target: vocabulary 100 \(this target: 96\)"):
        read_eagle3(tmp_path, spec, pipe.target.decoder.tok_embeddings)
    edited(target_hidden_size=64)
    with pytest.raises(ValueError, match=r"target hidden size 64 \(this target: 32\)"):
        read_eagle3(tmp_path, spec, pipe.target.decoder.tok_embeddings)
    edited(target_model_type="qwen2_5_vl")
    with pytest.raises(ValueError, match=r"target type 'qwen2_5_vl' \(this target: 'llava'\)"):
        read_eagle3(tmp_path, spec, pipe.target.decoder.tok_embeddings)
    edited(rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    with pytest.raises(ValueError, match="M-RoPE positions"):
        read_eagle3(tmp_path, spec, pipe.target.decoder.tok_embeddings)
    edited(architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="not an EAGLE-3 draft"):
        read_eagle3(tmp_path, spec, pipe.target.decoder.tok_embeddings)
    with pytest.raises(ValueError, match="neither an mmspec EAGLE-3 drafter nor an EAGLE-3 draft"):
        load_eagle3_drafter(tmp_path, pipe.target)
    edited()
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["t2d"] = ~tensors["t2d"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="t2d and d2t maps that disagree"):
        read_eagle3(tmp_path, spec, pipe.target.decoder.tok_embeddings)
    write_eagle3(head, tmp_path / "q")
    with pytest.raises(ValueError, match="target type 'llava' .this target: 'qwen2_vl'.; 1-D RoPE positions"):
        read_eagle3(tmp_path / "q", target_spec(_pipe("qwen2_vl").target), None)


# --------------------------------------------------------------------------- command line


def test_train_eagle3_then_export_on_the_command_line(tmp_path, capsys):
    from mmspec.app.cli import main

    model, processor = tiny_vlm("qwen2_vl")
    model.save_pretrained(tmp_path / "model")
    processor.image_processor.save_pretrained(tmp_path / "model")
    processor.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    for i in range(3):
        image(30 + i).save(tmp_path / "images" / f"{i}.png")
    pipe = VLMPipeline(load_vlm_target(model), processor)
    from mmspec.pipelines.vlm import pipeline_vlm

    original = pipeline_vlm.VLMPipeline.from_pretrained
    # The tiny Qwen processor is a stand-in (no torchvision on CPU CI): hand the CLI the same pipeline.
    pipeline_vlm.VLMPipeline.from_pretrained = classmethod(
        lambda cls, path, dtype=None, device=None, drafter=None: pipe
    )
    try:
        assert (
            main(
                [
                    "train-drafter",
                    "--arch",
                    "eagle3",
                    "--target-kind",
                    "vlm",
                    "--target-path",
                    str(tmp_path / "model"),
                    "--output",
                    str(tmp_path / "drafter"),
                    "--images",
                    str(tmp_path / "images"),
                    "--steps",
                    "3",
                    "--batch-size",
                    "2",
                    "--answer-len",
                    "6",
                    "--draft-vocab-size",
                    "40",
                    "--ttt-steps",
                    "2",
                    "--vocab-batches",
                    "2",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    finally:
        pipeline_vlm.VLMPipeline.from_pretrained = original
    trained = Eagle3Drafter.from_pretrained(tmp_path / "drafter", pipe.target)
    assert trained.head.config.draft_vocab_size == 40 and trained.head.config.mrope_section == (2, 1, 1)
    assert (
        main(
            [
                "export-drafter",
                str(tmp_path / "drafter"),
                "--format",
                "eagle3",
                "--out",
                str(tmp_path / "out"),
                "--layer-convention",
                "vllm",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [
        i + 1 for i in trained.head.config.aux_layer_ids
    ]
    assert config["mmspec"]["layer_convention"] == "vllm" and config["torch_dtype"] == "bfloat16"
    imported = load_eagle3_drafter(tmp_path / "out", pipe.target)  # the record says how the ids read
    assert imported.head.config.aux_layer_ids == trained.head.config.aux_layer_ids
    assert load_file(tmp_path / "out" / "model.safetensors")["fc.weight"].dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="only EAGLE-3 heads export"):
        from mmspec.pipelines.vlm.drafters import VLMEagleDrafter, VLMEagleHead

        VLMEagleDrafter(VLMEagleHead.for_target(pipe.target, "pool"), pipe.target).save_pretrained(tmp_path / "pool")
        main(["export-drafter", str(tmp_path / "pool"), "--out", str(tmp_path / "x")])


def test_eagle3_method_is_listed_only_with_a_path():
    from mmspec.app.demos.chat_app import default_drafters

    pipe = _pipe("llava")
    assert "eagle3" in pipe.methods and "eagle3" not in pipe.methods.available(pipe)
    assert not any(label.startswith("eagle3") for label in default_drafters(pipe))  # the demo builds what is listed
    with pytest.raises(ValueError, match="speculative='eagle3' needs speculative_options=\\{'path': DIR\\}"):
        pipe(image(0), QUESTION, speculative="eagle3")
