"""Vision-aware EAGLE drafters (none / full / pool / prune / ViSpec / FLASH / SpecVLM) on tiny random
LLaVA-1.5 and Qwen2-VL (M-RoPE) targets: losslessness, the cache layout each visual path builds,
incremental drafting against the training layout run from scratch, online distillation, save/load."""

from __future__ import annotations

import functools
from argparse import ArgumentParser

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmspec.drafters.eagle import TreeConfig
from mmspec.pipelines.vlm import VLMPipeline, load_vlm_target
from mmspec.pipelines.vlm.drafter_layout import lay_out, prompt_sequence, sequence_pairs
from mmspec.pipelines.vlm.drafters import VLMEagleDrafter, VLMEagleHead
from mmspec.pipelines.vlm.visual_paths import VISUAL_PATHS
from mmspec.sampling import SamplingConfig, logits_to_probs
from mmspec.training.eagle import EagleTrainConfig, add_train_drafter_args, eagle_training_pairs
from mmspec.training.vlm import (
    add_train_vlm_drafter_args,
    distilled_batches,
    train_vlm_drafter,
    train_vlm_drafter_command,
    vlm_prompt_sampler,
)
from mmspec.types import DraftContext

from ...conftest import assert_rows_follow, recording, run_distributed
from .test_vlm import CASES, GREEDY, _exact_joint, image, run_loop, tiny_pipeline, tiny_vlm

PATHS = sorted(VISUAL_PATHS)
FAMILIES = ["llava", "qwen2_vl"]
TREE = TreeConfig(depth=3, top_k=2, total_nodes=5)
QUESTIONS = ["describe the image", "what is in this picture", "a cat", "what is in this image"]
TRAINED = ("full", "vispec")


def new_head(family: str, path: str, seed: int = 0, **options) -> VLMEagleHead:
    torch.manual_seed(seed)
    return VLMEagleHead.for_target(
        tiny_pipeline(family).target, path, **{"ratio": 4, "num_queries": 4, **options}
    ).eval()


def encoded(family: str, images, prompts):
    pipe = tiny_pipeline(family)
    return pipe.target.encode_images(pipe.build_prompt(images, prompts))


def train_config(**kw) -> EagleTrainConfig:
    return EagleTrainConfig(**{"steps": 100, "batch_size": 8, "seq_len": 16, "lr": 1e-2, "progress": False, **kw})


@functools.cache
def memo_batches(family: str, seed: int = 0):
    """The self-distilled batches of ``train_config()`` (each step generated once, shared by runs)."""
    pipe = tiny_pipeline(family)
    items = [(image(10 + i, (16 + 4 * (i % 3), 20 + 4 * (i % 2))), QUESTIONS[i % 4]) for i in range(32)]
    config = train_config(seed=seed)
    return functools.lru_cache(maxsize=None)(
        distilled_batches(pipe.target, vlm_prompt_sampler(pipe, items, config.batch_size), config, SamplingConfig())
    )


@pytest.fixture(scope="module")
def trained():
    """``path -> head`` for the tiny LLaVA, 100 steps each on the same batches."""
    heads = {}
    for path in TRAINED:
        head = new_head("llava", path)
        train_vlm_drafter(tiny_pipeline("llava").target, head, memo_batches("llava"), train_config())
        heads[path] = head
    return heads


def head_for(family: str, path: str, trained: dict) -> VLMEagleHead:
    """The trained head, else a fresh one whose zero-initialised parts (ViSpec's global projection,
    FLASH's lookahead, SpecVLM's gate) are made random, so that every part takes effect."""
    if family == "llava" and path in trained:
        return trained[path]
    head = new_head(family, path)
    for name, p in head.named_parameters():
        if name.startswith(("visual.global_proj", "visual.gate", "lookahead")) and not p.any():
            torch.nn.init.normal_(p, std=0.3)
    return head


@functools.cache
def baseline(family: str):
    images, prompts = CASES["batch"]
    return run_loop(tiny_pipeline(family).target, encoded(family, images, prompts), max_new=20)


# --------------------------------------------------------------------------- losslessness


@pytest.mark.parametrize("tree", [None, TREE], ids=["chain", "tree"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculation_matches_baseline(family, path, tree, trained):
    """A ragged 2-row batch (one and two images) reproduces the greedy baseline token for token."""
    images, prompts = CASES["batch"]
    target = tiny_pipeline(family).target
    drafter = VLMEagleDrafter(head_for(family, path, trained), target, tree)
    spec = run_loop(target, encoded(family, images, prompts), drafter, k=TREE.depth, max_new=20)
    assert torch.equal(spec.tokens, baseline(family).tokens)
    if family == "llava" and path in trained:
        assert spec.stats.mean_accepted > 0.2 and spec.stats.steps < baseline(family).stats.steps


def test_exact_sampling_reproduces_target_distribution(trained):
    """ViSpec drafter, exact acceptance, LLaVA: the empirical joint law of the first 3 tokens over
    3000 rows stays within 3x the expected total-variation error of an exact sampler."""
    pipe = tiny_pipeline("llava")
    one = encoded("llava", image(0), "describe the image")
    n, length = 3000, 3
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    batch = type(one)(
        tokens=one.tokens.expand(n, -1), lengths=one.lengths.expand(n), image_features=one.image_features.repeat(n, 1)
    )
    drafter = VLMEagleDrafter(trained["vispec"], pipe.target)
    out = run_loop(pipe.target, batch, drafter, k=2, sampling=sampling, max_new=length, seed=7)
    exact = _exact_joint(pipe.target, one, length, sampling)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-5)
    assert_rows_follow(out.tokens, exact)
    assert out.stats.mean_accepted > 0.3  # speculation actually happened


# --------------------------------------------------------------------------- drafting = training layout


RecordingDrafter = recording(VLMEagleDrafter)


def reference_probs(head, target, one, answer: list[int], drafts: list[int], sampling) -> torch.Tensor:
    """The draft distributions ``[k, V]`` of a chain ``drafts`` after the single prompt ``one`` +
    ``answer``, from scratch: one causal pass of the head over the TRAINING layout of the committed
    sequence, then the drafted pairs appended ``tokens_per_step`` at a time (their features: the
    head's own predictions and, semi-AR, its lookahead ones; RoPE ids: text after the prompt)."""
    pairs = eagle_training_pairs(target, one, torch.tensor([answer]), one.tokens.shape[1])
    end = int(one.lengths[0]) + len(answer)
    seq = sequence_pairs(target, one, pairs.next_tokens, pairs.features, torch.tensor([end - 1]), head.fc.weight.dtype)
    layout = lay_out(head, seq)
    assert int(layout.source[0, -1]) == end - 2  # the last entry is the pair (f_{end-2}, x_{end-1})
    embeds, features, rope = layout.embeds, layout.features, layout.rope
    bias = layout.bias if layout.bias is not None else torch.zeros_like(embeds)

    def run() -> torch.Tensor:  # the newest entry's predicted feature [1, H]
        cache = head.new_cache(1, embeds.shape[1])
        slots = cache.slots(embeds.shape[1])
        return head.forward_inputs(embeds, features, rope, cache, slots, cache.attention_mask(slots), bias)[:, -1]

    steps, qs, feature = head.config.tokens_per_step, [], run()
    while True:
        group = head.lookahead_features(feature)  # [1, s, H]
        qs += list(logits_to_probs(head.logits(group), sampling)[0, : len(drafts) - len(qs)])
        if len(qs) == len(drafts):
            return torch.stack(qs)
        new = torch.tensor([drafts[len(qs) - steps : len(qs)]])
        position = end - 1 + len(qs) - steps + torch.arange(steps)  # sequence positions of the new pairs
        embeds = torch.cat([embeds, head.target_modules.embed(new)], 1)
        features = torch.cat([features, group], 1)
        rope = torch.cat([rope, (position + seq.rope_offsets).expand(3, 1, -1)], 2)
        bias = torch.cat([bias, layout.text_bias[:, None].expand(-1, steps, -1)], 1)
        feature = run()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_drafts_equal_training_layout(family, path, trained):
    """At every step (ragged acceptance, rollbacks, compressed prompt, M-RoPE offsets, ViSpec
    biases, FLASH's semi-AR groups) every draft distribution of the chain equals the head run from
    scratch over the training layout of the committed sequence plus the drafted pairs."""
    target = tiny_pipeline(family).target
    head = head_for(family, path, trained)
    sampling = SamplingConfig(temperature=1.0, top_k=20)
    images, prompts = CASES["batch"]
    prompt = encoded(family, images, prompts)
    drafter = RecordingDrafter(head, target)
    run_loop(target, prompt, drafter, k=4, sampling=sampling, max_new=12)
    singles = [encoded(family, images[row], prompts[row]) for row in range(2)]
    checked = 0
    for history, lengths, num_new, draft in drafter.records:
        for row in torch.nonzero(num_new).flatten().tolist():  # finished rows draft from frozen state
            answer = history[row, int(prompt.lengths[row]) : int(lengths[row])].tolist()
            want = reference_probs(head, target, singles[row], answer, draft.tokens[row].tolist(), sampling)
            torch.testing.assert_close(draft.draft_probs[row], want, atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked >= 8


def test_semi_autoregressive_chain_uses_fewer_head_forwards():
    """FLASH's s = 2 head drafts a chain of 4 with the catch-up and ONE more forward (plain: three)."""
    calls = {}
    target = tiny_pipeline("llava").target
    for path in ("flash", "full"):
        head = new_head("llava", path)
        forward = head.forward

        def counting(*args, _forward=forward, _path=path):
            calls[_path] = calls.get(_path, 0) + 1
            return _forward(*args)

        head.forward = counting
        out = run_loop(
            target, encoded("llava", image(0), "describe the image"), VLMEagleDrafter(head, target), k=4, max_new=11
        )
        assert calls[path] == (2 if path == "flash" else 4) * out.stats.steps
    assert head.config.tokens_per_step == 1 and new_head("llava", "flash").config.tokens_per_step == 2


# --------------------------------------------------------------------------- layouts


def layout_of(family: str, path: str, images, prompts, **options):
    pipe = tiny_pipeline(family)
    prompt = encoded(family, images, prompts)
    features = pipe.target.prefill(prompt, pipe.target.new_cache(len(prompts), 128)).hidden_states_all
    head = new_head(family, path, **options)
    seq = prompt_sequence(pipe.target, prompt, features, torch.float32)
    return prompt, seq, lay_out(head, seq), head


def image_entries(layout, row: int) -> list[int]:
    """RoPE t-ids (1-D targets: sequence positions) of the image entries of ``row``, in cache order."""
    n = int(layout.lengths[row])
    return layout.rope[0, row, :n][layout.source[row, :n] < 0].tolist()


@pytest.mark.parametrize(
    "path, expected",
    [
        ("none", []),
        ("full", list(range(1, 17))),
        ("pool", [1, 3, 9, 11]),  # 2x2 windows of the 4x4 grid, top-left tokens
        ("specvlm", [1, 3, 9, 11]),
        ("vispec", [3, 7, 11, 15]),  # m = 16 / 4 queries at floor((j + 1/2) * 16 / 4)
        ("flash", [3, 7, 11, 15]),
    ],
)
def test_llava_layout_positions(path, expected):
    """LLaVA-1.5 prompt ["USER:", 16 image tokens at positions 1..16, "describe the image
    ASSISTANT:"] (21 tokens, pairs t < 20): entries per path; text pairs at their own positions."""
    prompt, seq, layout, _ = layout_of("llava", path, [image(0)], ["describe the image"])
    assert (prompt.tokens[0, 1:17] == 4).all() and int(prompt.lengths[0]) == 21
    assert image_entries(layout, 0) == expected
    text = layout.source[0, : int(layout.lengths[0])]
    assert text[text >= 0].tolist() == [0, 17, 18, 19]  # pairs t < L - 1 outside the image
    assert int(layout.lengths[0]) == 4 + len(expected)


def test_llava_prune_keeps_the_largest_feature_norms():
    prompt, seq, layout, _ = layout_of("llava", "prune", [image(0)], ["describe the image"])
    norms = seq.features[0, 1:17].norm(dim=-1)
    want = sorted((norms.topk(4).indices + 1).tolist())
    assert image_entries(layout, 0) == want
    kept = [i for i, s in enumerate(layout.source[0].tolist()) if s < 0]
    torch.testing.assert_close(layout.features[0, kept], seq.features[0, want])


def test_llava_two_images_pool_per_image():
    """Two 4x4 images in one run of 32 tokens: pooled image by image (8 entries), values = window means."""
    prompt, seq, layout, _ = layout_of("llava", "pool", [[image(1), image(2)]], ["compare these two"])
    assert image_entries(layout, 0) == [1, 3, 9, 11, 17, 19, 25, 27]
    kept = [i for i, s in enumerate(layout.source[0].tolist()) if s < 0]
    window = [17, 18, 21, 22]  # second image, top-left 2x2 window
    torch.testing.assert_close(layout.features[0, kept[4]], seq.features[0, window].mean(0))
    embeds = seq.image.embeds[torch.tensor(window) - 1]
    torch.testing.assert_close(layout.embeds[0, kept[4]], embeds.mean(0))


@pytest.mark.parametrize(
    "path, count", [("none", 0), ("full", 6), ("pool", 2), ("prune", 2), ("vispec", 2), ("flash", 2), ("specvlm", 2)]
)
def test_qwen_layout_keeps_mrope_ids(path, count):
    """Qwen2-VL: a 2x3 merged-patch image at positions 3..8. Entries sit at their representative
    tokens with the target's own (t, h, w) ids; text after the image keeps its M-RoPE ids; the
    decode offsets map cache slots to the target's positions."""
    pipe = tiny_pipeline("qwen2_vl")
    prompt, seq, layout, head = layout_of("qwen2_vl", path, [image(0)], ["describe the image"])
    ids, delta = pipe.target.rope_positions(prompt)  # [3, 1, P], [1]
    n = int(layout.lengths[0])
    source = layout.source[0, :n]
    image_ids = layout.rope[:, 0, :n][:, source < 0].T.tolist()
    want = {
        "pool": [[3, 3, 3], [3, 3, 5]],
        "specvlm": [[3, 3, 3], [3, 3, 5]],
        "vispec": [[3, 3, 4], [3, 4, 4]],
        "flash": [[3, 3, 4], [3, 4, 4]],
        "full": ids[:, 0, 3:9].T.tolist(),
        "none": [],
    }
    if path == "prune":
        picked = sorted((seq.features[0, 3:9].norm(dim=-1).topk(2).indices + 3).tolist())
        want["prune"] = ids[:, 0, picked].T.tolist()
    assert (prompt.tokens[0, 3:9] == pipe.target.image_token_id).all() and len(image_ids) == count
    assert image_ids == want[path]
    text = source >= 0
    assert torch.equal(layout.rope[:, 0, :n][:, text], ids[:, 0, source[text]])
    drafter = VLMEagleDrafter(head, pipe.target)
    features = pipe.target.prefill(prompt, pipe.target.new_cache(1, 64))
    ctx = DraftContext(
        history=prompt.tokens,
        history_lengths=prompt.lengths,
        last_tokens=prompt.tokens[:, 0],
        positions=prompt.lengths,
        sampling=GREEDY,
    )
    drafter.prefill(ctx, prompt, features)
    last = int(prompt.lengths[0]) - 1  # the catch-up pair's sequence position
    assert int(drafter.cache.lengths[0]) + int(drafter.cache.slot_offsets[0]) == last
    assert int(drafter.cache.lengths[0]) + int(drafter.cache.rope_offsets[0]) == last + int(delta[0])


def test_vispec_global_feature_reaches_later_text_only():
    """ViSpec's global image feature (mean adaptor output, projected) is added to every text entry
    after the image and to generated tokens, not to text before it."""
    torch.manual_seed(3)
    prompt, seq, _, head = layout_of("qwen2_vl", "vispec", [[image(1), image(2)]], ["compare these two"])
    torch.nn.init.normal_(head.visual.global_proj.weight)
    layout = lay_out(head, seq)
    entries = head.visual(seq.image)
    glob = entries.span_global  # [2, H]: one per image
    starts = seq.image.position[seq.image.span_first].tolist()
    n = int(layout.lengths[0])
    for slot, t in enumerate(layout.source[0, :n].tolist()):
        if t < 0:
            assert layout.bias[0, slot].abs().max() == 0
            continue
        want = sum((glob[s] for s, start in enumerate(starts) if start < t), torch.zeros_like(glob[0]))
        torch.testing.assert_close(layout.bias[0, slot], want)
    torch.testing.assert_close(layout.text_bias[0], glob.sum(0))
    assert glob.abs().max() > 0


def test_specvlm_gate_chooses_the_primitive():
    """Zero gate (untrained): pooling. A gate favouring pruning: each window's max-norm token."""
    _, seq, layout, head = layout_of("llava", "specvlm", [image(0)], ["describe the image"])
    pooled = lay_out(new_head("llava", "pool"), seq)
    torch.testing.assert_close(layout.features, pooled.features)
    with torch.no_grad():
        head.visual.gate.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    pruned = lay_out(head, seq)
    kept = [i for i, s in enumerate(pruned.source[0].tolist()) if s < 0]
    window = seq.features[0, [1, 2, 5, 6]]  # first 2x2 window of the 4x4 grid at positions 1..16
    torch.testing.assert_close(pruned.features[0, kept[0]], window[window.norm(dim=-1).argmax()])


# --------------------------------------------------------------------------- training


def acceptance(head) -> float:
    target = tiny_pipeline("llava").target
    prompt = encoded("llava", [image(50 + i) for i in range(4)], QUESTIONS)  # images never trained on
    return run_loop(target, prompt, VLMEagleDrafter(head, target), k=4, max_new=20).stats.mean_accepted


@pytest.mark.parametrize("path", TRAINED)
def test_training_raises_acceptance(path, trained):
    untrained, after = acceptance(new_head("llava", path)), acceptance(trained[path])
    assert untrained < 0.1 and after > 0.3, (untrained, after)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """SpecVLM (its Gumbel gate draws from the global RNG, which checkpoints restore): crash at
    step 3, resume from the step-2 checkpoint -> the same weights as 6 uninterrupted steps."""
    target = tiny_pipeline("llava").target
    batches = memo_batches("llava")
    full = new_head("llava", "specvlm", seed=1)
    train_vlm_drafter(target, full, batches, train_config(steps=6))

    class Interrupted(Exception):
        pass

    def crashing(step):
        if step == 3:
            raise Interrupted
        return batches(step)

    first = new_head("llava", "specvlm", seed=1)
    with pytest.raises(Interrupted):
        train_vlm_drafter(target, first, crashing, train_config(steps=6, checkpoint_dir=tmp_path, checkpoint_every=2))
    resumed = new_head("llava", "specvlm", seed=9)
    losses = train_vlm_drafter(
        target, resumed, batches, train_config(steps=6, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    )
    assert len(losses) == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- save / load, CLI


def test_save_load_round_trip_and_target_checks(tmp_path, trained):
    target = tiny_pipeline("llava").target
    drafter = VLMEagleDrafter(trained["vispec"], target, TREE)
    drafter.save_pretrained(tmp_path)
    loaded = VLMEagleDrafter.from_pretrained(tmp_path, target, visual_path="vispec")
    assert loaded.tree == TREE and loaded.head.config == trained["vispec"].config
    for (name, a), b in zip(trained["vispec"].state_dict().items(), loaded.head.state_dict().values()):
        assert torch.equal(a, b), name
    prompt = encoded("llava", image(0), "describe the image")
    assert torch.equal(run_loop(target, prompt, loaded, k=3).tokens, run_loop(target, prompt, drafter, k=3).tokens)
    with pytest.raises(ValueError, match="uses visual path 'vispec', not 'pool'"):
        VLMEagleDrafter.from_pretrained(tmp_path, target, visual_path="pool")
    other = load_vlm_target(tiny_vlm("llava", seed=1)[0])  # same architecture, other weights
    with pytest.raises(ValueError, match="trained for another target: target_name 'sha256:"):
        VLMEagleDrafter.from_pretrained(tmp_path, other)
    with pytest.raises(ValueError, match="image_token_id 4 .this target: 5.*M-RoPE False .this target: True"):
        VLMEagleDrafter.from_pretrained(tmp_path, tiny_pipeline("qwen2_vl").target)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[next(iter(weights))]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"the weights of the VLM drafter in .* do not match its config \(missing keys"
    ):
        VLMEagleDrafter.from_pretrained(tmp_path, target, visual_path="vispec")


def test_train_drafter_cli(tmp_path):
    model, processor = tiny_vlm("llava")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    for i in range(3):
        image(20 + i).save(tmp_path / "images" / f"{i}.png")
    parser = ArgumentParser()
    add_train_drafter_args(parser)
    add_train_vlm_drafter_args(parser)
    args = parser.parse_args(
        [
            "--target-kind",
            "vlm",
            "--target-path",
            str(tmp_path / "model"),
            "--output",
            str(tmp_path / "drafter"),
            "--images",
            str(tmp_path / "images"),
            "--visual-path",
            "flash",
            "--ratio",
            "2",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--answer-len",
            "5",
            "--long-answers",
            "--device",
            "cpu",
        ]
    )
    assert train_vlm_drafter_command(args) == 0
    pipe = VLMPipeline.from_pretrained(tmp_path / "model")
    drafter = VLMEagleDrafter.from_pretrained(tmp_path / "drafter", pipe.target)
    assert (drafter.head.config.visual_path, drafter.head.config.ratio, drafter.head.config.tokens_per_step) == (
        "flash",
        2,
        2,
    )
    out = pipe(image(0), "describe the image", max_new_tokens=8, drafter=drafter, num_draft_tokens=3)
    assert out.text == pipe(image(0), "describe the image", max_new_tokens=8, num_draft_tokens=0).text


def test_training_runs_data_parallel_in_two_processes(tmp_path):
    """`torchrun` / `accelerate launch` with 2 processes (CPU: gloo): weights broadcast from rank 0,
    gradients averaged, rank 0 saves; the head then drafts losslessly for the embedded captioner."""
    from mmspec.app.defaults import default_captioner_path, load_default_captioner

    out = tmp_path / "head"
    run = run_distributed(
        ["train-drafter", "--target-kind", "vlm", "--target-path", str(default_captioner_path())]
        + ["--output", str(out), "--visual-path", "pool", "--steps", "4", "--batch-size", "4", "--device", "cpu"],
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    pipe = load_default_captioner()
    drafter = VLMEagleDrafter.from_pretrained(out, pipe.target)
    pictures = [image(i) for i in range(3)]
    base = pipe([[p] for p in pictures], ["What is in the image?"] * 3, max_new_tokens=8, num_draft_tokens=0)
    spec = pipe(
        [[p] for p in pictures], ["What is in the image?"] * 3, max_new_tokens=8, drafter=drafter, num_draft_tokens=3
    )
    assert spec.text == base.text
