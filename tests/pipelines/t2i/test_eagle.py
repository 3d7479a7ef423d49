"""EAGLE heads for Janus and Emu3 (``speculative="eagle"``): greedy chains and EAGLE-2 trees equal the
baseline (and transformers' own ``generate``) token for token under CFG, self-distillation training
lowers the loss and makes the head keep more drafts, the head is saved with the pipeline and refused by
another target, and ``mmspec train-drafter --target-kind janus|emu3`` trains one from a local folder."""

import functools

import pytest
import torch

pytest.importorskip("transformers")

from mmspec.drafters.eagle import TreeConfig  # noqa: E402
from mmspec.pipelines.t2i import Emu3ImagePipeline, JanusImagePipeline  # noqa: E402
from mmspec.sampling import SamplingConfig  # noqa: E402
from mmspec.training.eagle import EagleTrainConfig, self_distilled_batches, train_eagle_head  # noqa: E402
from mmspec.training.t2i import t2i_prompt_sampler  # noqa: E402

from . import test_emu3, test_janus  # noqa: E402
from .test_emu3 import NEGATIVE, WRAP, H, W, tiny_emu3  # noqa: E402
from .test_janus import BOI, BOS, tiny_janus  # noqa: E402

JANUS_LINES = [f"{BOS} {a} {b} {BOI}" for a in range(2, 12) for b in range(2, 6)]
JANUS_EVAL = torch.tensor([[BOS, a, b, BOI] for a in range(2, 12, 2) for b in range(2, 6, 2)])
TREE = TreeConfig(depth=3, top_k=2, total_nodes=5)


def _train(pipe, lines, steps, guidance_scale=3.0):
    config = EagleTrainConfig(steps=steps, batch_size=8, lr=3e-3, seq_len=pipe.target.num_tokens, progress=False)
    make_prompt, config.max_prompt_len = t2i_prompt_sampler(pipe, lines, config.batch_size, cfg=guidance_scale > 1)
    sampling = SamplingConfig(temperature=0, guidance_scale=guidance_scale)
    torch.manual_seed(0)
    head = pipe.new_eagle_head()
    losses = train_eagle_head(
        pipe.target, head, self_distilled_batches(pipe.target, make_prompt, config, sampling), config
    )
    return head, losses


@functools.cache
def janus_with_trained_head():
    pipe = JanusImagePipeline(tiny_janus(sharpness=4.0))
    pipe.set_progress_bar_config(disable=True)
    head, losses = _train(pipe, JANUS_LINES, steps=60)
    pipe.attach_eagle_head(head)
    return pipe, losses


@functools.cache
def emu3_with_head():
    pipe = Emu3ImagePipeline(tiny_emu3(), height=H, width=W)
    pipe.set_progress_bar_config(disable=True)
    lines = [f"1 {a} {b} 32 {WRAP}" for a in range(3, 9) for b in range(3, 6)]
    head, _ = _train(pipe, lines, steps=10, guidance_scale=1.0)  # token-id prompts: no negative prompt
    pipe.attach_eagle_head(head)
    return pipe


def test_training_lowers_the_loss_and_keeps_more_drafts():
    pipe, losses = janus_with_trained_head()
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), losses
    assert all(p.grad is None for p in pipe.model.parameters())  # the shared target modules stay frozen
    kw = dict(input_ids=JANUS_EVAL, guidance_scale=3.0, temperature=0, speculative="eagle", output_type="tokens")
    trained = pipe(**kw, num_draft_tokens=4).stats.mean_accepted
    torch.manual_seed(0)
    untrained_pipe = JanusImagePipeline(pipe.model, eagle=pipe.new_eagle_head())
    untrained_pipe.set_progress_bar_config(disable=True)
    untrained = untrained_pipe(**kw, num_draft_tokens=4).stats.mean_accepted
    assert trained > 0.5 and trained > 10 * untrained, (trained, untrained)


@pytest.mark.parametrize("tree", [None, TREE])
@pytest.mark.parametrize("guidance_scale", [3.0, 5.0])
def test_janus_greedy_eagle_equals_transformers_generate(tree, guidance_scale):
    pipe, _ = janus_with_trained_head()
    ids = JANUS_EVAL[:3]
    expected = test_janus._hf_greedy(pipe.model, ids, torch.ones_like(ids), guidance_scale)
    out = pipe(
        input_ids=ids,
        guidance_scale=guidance_scale,
        temperature=0,
        speculative="eagle",
        speculative_options={"tree": tree},
        num_draft_tokens=4 if tree is None else tree.depth,
        output_type="tokens",
    )
    assert torch.equal(out.tokens.flatten(1), expected)
    assert out.stats.steps < pipe.target.num_tokens - 1  # the trained head keeps drafts


@pytest.mark.parametrize("tree", [None, TREE])
def test_emu3_greedy_eagle_equals_transformers_generate(tree):
    pipe = emu3_with_head()
    expected = test_emu3._hf_greedy(pipe.model, 3.0)
    out = pipe(
        input_ids=test_emu3.PROMPTS,
        negative_prompt_ids=NEGATIVE,
        guidance_scale=3.0,
        temperature=0,
        speculative="eagle",
        speculative_options={"tree": tree},
        num_draft_tokens=4 if tree is None else tree.depth,
        output_type="tokens",
    )
    assert torch.equal(pipe.bpe_sequences(out.tokens), expected)


def test_exact_eagle_sampling_is_seeded_and_lossless_in_law_of_the_first_token():
    """Sampling with EAGLE drafts: the first image token of 4k rows follows the target's CFG law."""
    from mmspec.sampling import logits_to_probs

    from ...conftest import assert_rows_follow

    pipe, _ = janus_with_trained_head()
    n = 4000
    kw = dict(guidance_scale=2.0, top_k=4, speculative="eagle", num_draft_tokens=3, output_type="tokens")
    out = pipe(input_ids=JANUS_EVAL[:1].expand(n, -1), generator=torch.Generator().manual_seed(0), **kw)
    prompt = pipe.prompt_inputs(None, JANUS_EVAL[:1], None)
    first = pipe.target.prefill(prompt, pipe.target.new_cache(1, 8, cfg=True)).output
    p = logits_to_probs(first.logits[0, -1], SamplingConfig(top_k=4, guidance_scale=2.0), first.uncond_logits[0, -1])
    exact = {(a,): float(p[a]) for a in range(len(p)) if p[a] > 0}
    assert_rows_follow(out.tokens.flatten(1)[:, :1], exact)
    again = pipe(input_ids=JANUS_EVAL[:1].expand(8, -1), generator=torch.Generator().manual_seed(5), **kw)
    same = pipe(input_ids=JANUS_EVAL[:1].expand(8, -1), generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(again.tokens, same.tokens)


def test_head_is_saved_with_the_pipeline_and_refused_by_another_target(tmp_path):
    pipe, _ = janus_with_trained_head()
    pipe.save_pretrained(tmp_path / "janus")
    assert (tmp_path / "janus" / "eagle" / "model.safetensors").is_file()
    loaded = JanusImagePipeline.from_pretrained(tmp_path / "janus")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.eagle is not None
    kw = dict(input_ids=JANUS_EVAL[:2], guidance_scale=3.0, temperature=0, speculative="eagle", output_type="tokens")
    assert torch.equal(loaded(**kw).tokens, pipe(**kw).tokens)
    assert loaded(**kw).stats.steps == pipe(**kw).stats.steps  # the same head: the same drafts
    other = JanusImagePipeline(tiny_janus(seed=1))
    with pytest.raises(ValueError, match="was trained for target"):
        other.load_eagle_head(tmp_path / "janus" / "eagle")
    with pytest.raises(ValueError, match="holds a 'JanusImagePipeline' pipeline, not a Emu3ImagePipeline"):
        Emu3ImagePipeline.from_pretrained(tmp_path / "janus")


def test_to_moves_and_casts_the_head():
    pipe, _ = janus_with_trained_head()
    kw = dict(input_ids=JANUS_EVAL[:2], guidance_scale=3.0, temperature=0, output_type="tokens")
    copy = JanusImagePipeline(tiny_janus(sharpness=4.0))
    copy.set_progress_bar_config(disable=True)
    copy.attach_eagle_head(pipe.new_eagle_head())
    copy.eagle.load_state_dict(pipe.eagle.state_dict())
    copy.to(torch.float64)
    assert (
        copy.eagle.fc.weight.dtype == torch.float64
        and copy.target.decoder.output.proj_out.weight.dtype == torch.float64
    )
    assert torch.equal(copy(**kw, speculative="eagle").tokens, copy(**kw).tokens)


def test_emu3_grid_is_recorded_and_required(tmp_path):
    pipe = emu3_with_head()
    pipe.model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"does not record \['height', 'width'\]"):
        Emu3ImagePipeline.from_pretrained(tmp_path / "plain")
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = Emu3ImagePipeline.from_pretrained(tmp_path / "pipe")
    assert (loaded.height, loaded.width) == (H, W) and loaded.eagle is not None


@pytest.mark.parametrize("kind", ["janus", "emu3"])
def test_train_drafter_command(kind, tmp_path):
    from mmspec.app.cli import main

    if kind == "janus":
        pipe = JanusImagePipeline(tiny_janus(sharpness=4.0))
        lines, extra = JANUS_LINES[:6], ["--guidance-scale", "3"]
    else:
        pipe = Emu3ImagePipeline(tiny_emu3(), height=H, width=W)
        lines, extra = [f"1 {a} 4 32 {WRAP}" for a in range(3, 7)], ["--grid", f"{H}x{W}"]
    pipe.model.save_pretrained(tmp_path / "model")  # a plain transformers folder
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    args = ["train-drafter", "--target-kind", kind, "--target-path", str(tmp_path / "model"), "--output"]
    common = ["--prompts", str(tmp_path / "prompts.txt"), "--steps", "3", "--batch-size", "2", "--device", "cpu"]
    assert main([*args, str(tmp_path / "head"), *common, *extra]) == 0
    pipe.load_eagle_head(tmp_path / "head")
    assert pipe.eagle.config.vocab_size == pipe.target.vocab_size
    (tmp_path / "bad.txt").write_text("not token ids\n")
    bad = [*args, str(tmp_path / "head2"), "--prompts", str(tmp_path / "bad.txt"), "--device", "cpu", *extra]
    with pytest.raises(SystemExit, match="must list token ids"):
        main(bad)
    with pytest.raises(SystemExit, match="--target-name does not apply"):
        main([*args, str(tmp_path / "head3"), *common, *extra, "--target-name", "mine"])


def test_text_prompts_for_training_go_through_the_processor_with_the_negative_prompt():
    pipe = Emu3ImagePipeline(tiny_emu3(), height=H, width=W, processor=test_emu3.tiny_processor())
    make_prompt, longest = t2i_prompt_sampler(pipe, ["a red cat", "cat"], batch_size=3, cfg=True)
    prompt = make_prompt(torch.Generator().manual_seed(0))
    assert prompt.input_ids.shape[0] == 3 and prompt.input_ids.shape[1] <= longest
    assert not torch.equal(prompt.uncond_ids, prompt.input_ids)  # the (empty) negative prompt's row
    assert bool(prompt.attention_mask[:, -1].all())  # left padding: every prompt ends at the last column
