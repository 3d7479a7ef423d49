"""The Janus / Janus-Pro and Emu3 families of ``mmspec generate`` (text-to-image through transformers;
a local folder: a saved ``JanusImagePipeline`` / ``Emu3ImagePipeline``, or the transformers model with
its processor). See :mod:`mmspec.app.generators`; EAGLE heads come from the folder's ``eagle/`` or
``--eagle-head`` (with ``--eagle-tree``), as for LlamaGen."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .generators import (
    PROMPTS,
    BatchRun,
    FamilyJob,
    GenerationFamily,
    call_settings,
    check_eagle_args,
    load_eagle_head,
    register_family,
    save_image_result,
)


def _janus_methods():
    from ..pipelines.t2i import JANUS_METHODS

    return JANUS_METHODS


def _emu3_methods():
    from ..pipelines.t2i import EMU3_METHODS

    return EMU3_METHODS


def _add_emu3_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--emu3-grid",
        default=None,
        metavar="HxW",
        help="the image-token grid to generate (default: the one a saved Emu3ImagePipeline records)",
    )
    group.add_argument(
        "--negative-prompt",
        default="",
        help="Emu3: the classifier-free guidance negative prompt",
    )


def _check_args(args: argparse.Namespace) -> None:
    from ..training.t2i import parse_grid

    check_eagle_args(args)
    if getattr(args, "emu3_grid", None) is not None:
        try:
            parse_grid(args.emu3_grid)
        except argparse.ArgumentTypeError as err:
            raise SystemExit(f"error: --emu3-grid: {err}") from None


def _load(args: argparse.Namespace, path: Path | None, device, dtype):
    from ..pipelines.t2i import T2IPipeline
    from ..training.t2i import parse_grid

    options = {}
    if getattr(args, "emu3_grid", None) is not None:
        options = dict(zip(("height", "width"), parse_grid(args.emu3_grid)))
    try:
        pipe = T2IPipeline.from_pretrained(path, torch_dtype=dtype, **options)
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(f"error: --model {path}: {err}") from None
    if pipe.processor is None:
        raise SystemExit(
            f"error: --model {path}: the folder has no processor (JanusProcessor / Emu3Processor), which text "
            "prompts need: save it into the folder (processor.save_pretrained)"
        )
    return load_eagle_head(args, pipe.to(device))


def _prepare(pipe: Any, args: argparse.Namespace, device) -> FamilyJob:
    import torch

    job = call_settings(pipe, args, device)
    call = job.call
    negative = {} if pipe.model_type != "emu3" else {"negative_prompt": args.negative_prompt}
    # The processor and the negative prompt are checked here (a failure would otherwise hit every item).
    pipe.prompt_inputs(["a check of the processor"], cfg=args.guidance_scale > 1, **negative)

    def parse(value: str) -> str:
        if not value.strip():
            raise ValueError("an empty prompt")
        return value

    def process(items) -> list[dict]:
        seed = args.seed + items[0].index
        start = time.perf_counter()
        out = pipe(
            prompt=[it.value for it in items],
            generator=torch.Generator(device).manual_seed(seed),
            **negative,
            **call,
        )
        batch = BatchRun(out.stats, seed, time.perf_counter() - start, pipe.token_grid)
        records = []
        for row, (item, image) in enumerate(zip(items, out.images)):
            name = f"{item.index:05d}.png"
            records.append(save_image_result(args, batch, row, item, image, name, {"prompt": item.value}))
        return records

    settings = {
        **job.settings,
        "model": args.model,
        "pipeline": type(pipe).__name__,
        "emu3_grid": getattr(args, "emu3_grid", None),
        "eagle_head": args.eagle_head,
        "dtype": str(pipe.dtype),
        **negative,
    }
    return FamilyJob(parse=parse, process=process, settings=settings, summary=job.summary)


JANUS_FAMILY = register_family(
    GenerationFamily(
        name="janus",
        description="Janus / Janus-Pro text-to-image (a local transformers folder with its JanusProcessor)",
        pipeline_class="JanusImagePipeline",
        inputs=PROMPTS,
        methods=_janus_methods,
        load=_load,
        prepare=_prepare,
        default_method="mc-sjd",
        model_types=("janus",),
        check_args=_check_args,
        reads=("eagle_head", "eagle_tree", "heatmaps"),
    )
)

EMU3_FAMILY = register_family(
    GenerationFamily(
        name="emu3",
        description="Emu3 text-to-image (a local transformers folder with its Emu3Processor)",
        pipeline_class="Emu3ImagePipeline",
        inputs=PROMPTS,
        methods=_emu3_methods,
        load=_load,
        prepare=_prepare,
        default_method="mc-sjd",
        model_types=("emu3",),
        add_args=_add_emu3_args,
        check_args=_check_args,
        reads=("eagle_head", "eagle_tree", "heatmaps"),
    )
)
