"""What the reference recipes save beside their models, and loading a saved captioner back. The
recipes (:mod:`mmspec.training.reference`, :mod:`mmspec.training.captioner`) write these files; the
application layer (:mod:`mmspec.app.defaults`, the chat demo) reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers' VLM classes load only when a captioner is requested
    from ..pipelines.vlm import VLMPipeline

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
    try:
        ids = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not JSON: {err}") from None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{file} must hold a non-empty list of token ids (non-negative integers)")
    return ids


def load_captioner_pipeline(path: str | Path, device: str | torch.device = "cpu") -> VLMPipeline:
    """A :class:`~mmspec.pipelines.vlm.VLMPipeline` for the captioner saved in ``path``, in float32 on
    ``device``, whose default drafter is the :class:`~mmspec.drafters.ModelDrafter` over
    ``path/drafter`` when that folder exists (scoring only its :data:`DRAFT_VOCAB_FILE` ids when it
    has one, and using the target's vision modules when its own hold the same weights).

    Raises:
        FileNotFoundError: ``path`` holds no saved model.
    """
    from ..drafters import ModelDrafter
    from ..pipelines.vlm import VLMPipeline, load_vlm_target, share_vision_modules

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no captioner in {path} (config.json is missing)")
    # float32 explicitly: the weights may be stored in float16 to keep the package small.
    pipe = VLMPipeline.from_pretrained(path, dtype=torch.float32, device=device)
    drafter_path = path / CAPTIONER_DRAFTER_SUBFOLDER
    if (drafter_path / "config.json").is_file():
        draft = load_vlm_target(drafter_path, dtype=torch.float32, device=device)
        share_vision_modules(draft, pipe.target)  # the recipe's draft has the target's vision weights
        pipe.drafter = ModelDrafter(draft.with_draft_vocab(read_draft_vocab(drafter_path)))
    return pipe
