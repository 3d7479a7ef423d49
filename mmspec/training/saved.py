"""What the reference recipes save beside their models, and loading a saved captioner back. The
recipes (:mod:`mmspec.training.reference`, :mod:`mmspec.training.captioner`) write these files; the
application layer (:mod:`mmspec.app.defaults`, the chat demo) reads them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoint_io import read_json

if TYPE_CHECKING:  # transformers' VLM classes load only when a captioner is requested
    from ..drafters import ModelDrafter
    from ..pipelines.vlm import VLMPipeline, VLMTarget

#: File next to a saved reference pipeline listing its classes (label, emoji, Unicode name).
CLASSES_FILE = "classes.json"
#: Subfolder of a saved captioner holding its draft model (a full LLaVA model, same processor).
CAPTIONER_DRAFTER_SUBFOLDER = "drafter"
#: File in a captioner's drafter folder listing the target ids its LM head scores (a reduced draft
#: vocabulary: :class:`~mmspec.pipelines.vlm.decoder.DraftVocabHead`), a JSON list of ints.
DRAFT_VOCAB_FILE = "draft_vocab.json"


def read_draft_vocab(folder: str | Path) -> list[int] | None:
    """The draft vocabulary saved in ``folder`` (:data:`DRAFT_VOCAB_FILE`), or None when it has none.

    Raises:
        ValueError: the file is not a non-empty JSON list of non-negative integers.
    """
    file = Path(folder) / DRAFT_VOCAB_FILE
    if not file.is_file():
        return None
    ids = read_json(file)  # ValueError naming the file when it is not JSON
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{file} must hold a non-empty list of token ids (non-negative integers)")
    return ids


def captioner_drafter(
    draft: VLMTarget, target: VLMTarget, folder: str | Path, draft_vocab: bool = True
) -> ModelDrafter:
    """The :class:`~mmspec.drafters.ModelDrafter` over a saved captioner's draft model ``draft``
    (loaded from ``folder``) for ``target``: it uses the target's vision modules when its own hold the
    same weights (:func:`~mmspec.pipelines.vlm.share_vision_modules`: one image encoding per prompt;
    the recipe's draft has a frozen copy) and, with ``draft_vocab``, scores only the folder's
    :data:`DRAFT_VOCAB_FILE` ids when it has one."""
    from ..drafters import ModelDrafter
    from ..pipelines.vlm import share_vision_modules

    share_vision_modules(draft, target)
    return ModelDrafter(draft.with_draft_vocab(read_draft_vocab(folder) if draft_vocab else None))


def load_captioner_pipeline(path: str | Path, device: str | torch.device = "cpu") -> VLMPipeline:
    """A :class:`~mmspec.pipelines.vlm.VLMPipeline` for the captioner saved in ``path``, in float32 on
    ``device``, whose default drafter is :func:`captioner_drafter` over ``path/drafter`` when that
    folder exists.

    Raises:
        FileNotFoundError: ``path`` holds no saved model.
    """
    from ..pipelines.vlm import VLMPipeline, load_vlm_target

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no captioner in {path} (config.json is missing)")
    # float32 explicitly: the weights may be stored in float16 to keep the package small.
    pipe = VLMPipeline.from_pretrained(path, dtype=torch.float32, device=device)
    drafter_path = path / CAPTIONER_DRAFTER_SUBFOLDER
    if (drafter_path / "config.json").is_file():
        draft = load_vlm_target(drafter_path, dtype=torch.float32, device=device)
        pipe.drafter = captioner_drafter(draft, pipe.target, drafter_path)
    return pipe
