"""What the reference recipes save beside their models, and loading a saved captioner back. The
recipes (:mod:`mmspec.training.reference`, :mod:`mmspec.training.captioner`) write these files; the
application layer (:mod:`mmspec.app.defaults`, the chat demo) reads them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers' VLM classes load only when a captioner is requested
    from ..pipelines.vlm import VLMPipeline

#: File next to a saved reference pipeline listing its classes (label, emoji, Unicode name).
CLASSES_FILE = "classes.json"
#: Subfolder of a saved captioner holding its draft model (a full LLaVA model, same processor).
CAPTIONER_DRAFTER_SUBFOLDER = "drafter"


def load_captioner_pipeline(path: str | Path, device: str | torch.device = "cpu") -> VLMPipeline:
    """A :class:`~mmspec.pipelines.vlm.VLMPipeline` for the captioner saved in ``path``, in float32 on
    ``device``, whose default drafter is the :class:`~mmspec.drafters.ModelDrafter` over
    ``path/drafter`` when that folder exists.

    Raises:
        FileNotFoundError: ``path`` holds no saved model.
    """
    from ..drafters import ModelDrafter
    from ..pipelines.vlm import VLMPipeline, load_vlm_target

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no captioner in {path} (config.json is missing)")
    drafter_path = path / CAPTIONER_DRAFTER_SUBFOLDER
    drafter = None
    if (drafter_path / "config.json").is_file():
        # float32 explicitly: the weights may be stored in float16 to keep the package small.
        drafter = ModelDrafter(load_vlm_target(drafter_path, dtype=torch.float32, device=device))
    return VLMPipeline.from_pretrained(path, dtype=torch.float32, device=device, drafter=drafter)
