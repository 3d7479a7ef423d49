"""Generation families: what ``mmspec generate`` and ``mmspec eval`` need to know about each
pipeline family (LlamaGen, MAR, video, Janus, Emu3, ...), in one registry.

``--model`` names a family (its embedded default model), an embedded model (a folder under
``mmspec/assets/``) or a local folder; the folder's ``model_index.json`` ``_class_name`` (diffusers
pipelines) or ``config.json`` ``model_type`` (transformers models) picks the family. The commands
then run the family's hooks around the shared job machinery (:mod:`mmspec.app.jobs`: batches,
resume, sharding, bad items, ``stats.json``):

1. ``check_args(args)`` — settings wrong for every item, before any model loads;
2. ``load(args, path, device, dtype)`` — the pipeline (``path`` None: the embedded default);
3. ``prepare(pipe, args, device)`` → :class:`FamilyJob` — settings checked against the model, the
   per-item parser, the batch function that generates and saves, and what goes into ``job.json`` /
   ``stats.json``;
4. ``evaluate(pipe, args, device)`` — ``mmspec eval`` (quality next to speed), where the family has one.

Families register from the modules in :data:`FAMILY_MODULES` (one per family, beside this one), so
building the parser (``mmspec generate --help``) imports no torch: the modules import it inside their hooks.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint_io import read_json

if TYPE_CHECKING:
    import torch

    from ..methods import MethodRegistry
    from .jobs import JobItem

#: Inputs a family generates from: class ids (``--class-labels`` / ``--labels-file``) or text
#: (``--prompt`` / ``--prompts-file``).
CLASS_LABELS, PROMPTS = "class_labels", "prompts"


@dataclass
class FamilyJob:
    """One ``mmspec generate`` job of a family, prepared once the pipeline is loaded.

    ``parse(raw) -> value`` raises ``ValueError`` for a bad item (cheap: no generation);
    ``process(items) -> [record]`` generates one batch, saves each item's files in the output folder
    and returns one JSON-serialisable record per item (``row_steps`` / ``row_accepted`` when the
    family counts drafts); ``settings``: what makes the outputs what they are (``job.json``: a resumed
    job must not change them); ``summary``: extra fields for ``stats.json``; ``what``: the noun for
    the outputs ("images", "videos"); ``rate_label``: what ``row_accepted / row_steps`` means.
    """

    parse: Callable[[str], Any]
    process: Callable[[list[JobItem]], list[dict]]
    settings: dict
    summary: dict
    what: str = "images"
    rate_label: str = "mean accepted drafts per step"


@dataclass(frozen=True)
class GenerationFamily:
    """A pipeline family as the commands see it (see the module docstring for the hooks' order).

    ``pipeline_class``: the ``_class_name`` its saved folders carry; ``model_types``: transformers
    ``config.json`` ``model_type`` values it loads (families built on transformers models);
    ``embedded``: the folder under ``mmspec/assets/`` of its default model, or None;
    ``methods``: its method registry (imported lazily); ``default_method``: ``--speculative``'s
    default for it; ``inputs``: :data:`CLASS_LABELS` or :data:`PROMPTS`; ``add_args``: its own
    ``generate`` options (a group of the parser; names must not clash with other families');
    ``reads``: other families' options (argparse ``dest`` names) it reads too — every other family
    option set for one of its models is refused (:func:`check_foreign_options`);
    ``default_num_draft_tokens``: ``--num-draft-tokens`` when not given (MAR: CSpD's γ).
    """

    name: str
    description: str
    pipeline_class: str
    inputs: str
    methods: Callable[[], MethodRegistry]
    load: Callable[[argparse.Namespace, Path | None, torch.device, torch.dtype], Any]
    prepare: Callable[[Any, argparse.Namespace, torch.device], FamilyJob]
    default_method: str | None = None
    embedded: str | None = None
    model_types: tuple[str, ...] = ()
    add_args: Callable[[argparse._ArgumentGroup], None] | None = None
    check_args: Callable[[argparse.Namespace], None] | None = None
    evaluate: Callable[[Any, argparse.Namespace, torch.device], int] | None = None
    add_eval_args: Callable[[argparse._ArgumentGroup], None] | None = field(default=None)
    reads: tuple[str, ...] = ()
    default_num_draft_tokens: int = 8


GENERATION_FAMILIES: dict[str, GenerationFamily] = {}
#: Modules that register a family when imported.
FAMILY_MODULES = (
    "mmspec.app.generate_llamagen",
    "mmspec.app.generate_mar",
    "mmspec.app.generate_t2i",
    "mmspec.app.generate_video",
)


def register_family(family: GenerationFamily) -> GenerationFamily:
    """Add ``family`` to :data:`GENERATION_FAMILIES` (names are unique)."""
    if family.name in GENERATION_FAMILIES and GENERATION_FAMILIES[family.name] is not family:
        raise ValueError(f"generation family {family.name!r} is registered twice")
    GENERATION_FAMILIES[family.name] = family
    return family


def _own_options(family: GenerationFamily) -> list[argparse.Action]:
    """The actions ``family.add_args`` defines (built on a scratch parser)."""
    if family.add_args is None:
        return []
    scratch = argparse.ArgumentParser(add_help=False)
    family.add_args(scratch.add_argument_group())
    return scratch._actions


def check_foreign_options(args: argparse.Namespace, family: GenerationFamily) -> None:
    """``SystemExit`` when an option that only other families read is set (not at its default) for a
    ``family`` model: it would be silently ignored."""
    mine = {action.dest for action in _own_options(family)} | set(family.reads)
    for other in load_families().values():
        if other is family:
            continue
        for action in _own_options(other):
            if action.dest not in mine and getattr(args, action.dest, action.default) != action.default:
                raise SystemExit(
                    f"error: {action.option_strings[0]} is an option of {other.name} models; this is a "
                    f"{family.name} model, which does not read it"
                )


def load_families() -> dict[str, GenerationFamily]:
    """Import every family module and return the registry."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return GENERATION_FAMILIES


def check_eagle_args(args: argparse.Namespace) -> None:
    """``--eagle-head`` (a folder) and ``--eagle-tree`` (``DEPTH,TOP_K,NODES`` with ``--speculative
    eagle``), checked before any model loads (the options are LlamaGen's group's; every family with
    an ``eagle`` method reads them)."""
    import os

    if args.eagle_head is not None and not os.path.isdir(args.eagle_head):
        raise SystemExit(f"error: --eagle-head {args.eagle_head}: no such folder")
    if args.eagle_tree:
        parts = args.eagle_tree.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            raise SystemExit(
                f"error: --eagle-tree must be three positive integers DEPTH,TOP_K,NODES, got {args.eagle_tree!r}"
            )
        if args.speculative != "eagle":
            raise SystemExit("error: --eagle-tree needs --speculative eagle")


def load_eagle_head(args: argparse.Namespace, pipe: Any) -> Any:
    """``pipe`` with the ``--eagle-head`` folder attached (when given); a head for another model is a
    clear ``SystemExit``."""
    if getattr(args, "eagle_head", None):
        try:
            pipe.load_eagle_head(args.eagle_head)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --eagle-head {args.eagle_head}: {err}") from None
    return pipe


def eagle_tree_option(args: argparse.Namespace, speculative_options: dict) -> int:
    """Put ``--eagle-tree`` into ``speculative_options`` (as ``tree``) and return the call's
    ``num_draft_tokens`` (a tree's is its depth; else ``--num-draft-tokens``)."""
    if not args.eagle_tree:
        return args.num_draft_tokens
    from ..drafters.eagle import TreeConfig

    depth, top_k, nodes = (int(x) for x in args.eagle_tree.split(","))
    speculative_options["tree"] = TreeConfig(depth=depth, top_k=top_k, total_nodes=nodes)
    return depth


@dataclass
class CallSettings:
    """A ``generate`` job's sampling and speculation from the shared options, checked against the
    pipeline once: ``call`` (the pipeline call's keyword arguments), ``settings`` / ``summary`` (their
    ``job.json`` / ``stats.json`` fields; families add their own, e.g. the model)."""

    call: dict
    settings: dict
    summary: dict


def call_settings(pipe: Any, args: argparse.Namespace, device: torch.device) -> CallSettings:
    """The shared options (sampling, ``--speculative`` + options + ``--eagle-tree``, ``--acceptance`` +
    options) as one pipeline call's arguments. The method's drafter and the rule are built (and their
    settings checked) here, once: inside the job a ValueError would only mark items as bad.

    Raises:
        ValueError: a setting that is wrong for every item (unknown method or option, a greedy-only rule
            under sampling, ...).
    """
    from ..sampling import SamplingConfig
    from .jobs import parse_key_values

    acceptance_options = parse_key_values(args.acceptance_option, "--acceptance-option")
    speculative_options = parse_key_values(args.speculative_option, "--speculative-option")
    speculative = None if args.speculative == "none" else args.speculative
    num_draft_tokens = eagle_tree_option(args, speculative_options)
    spec = pipe.resolve_speculation(speculative, speculative_options, args.acceptance, acceptance_options)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if spec.rule.requires_greedy and not sampling.greedy:
        raise ValueError(f"rule {spec.rule!r} needs greedy decoding: add --temperature 0 (or --top-k 1)")
    sampling_args = {
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }
    call = {
        **sampling_args,
        "speculative": speculative,
        "num_draft_tokens": num_draft_tokens,
        "acceptance": spec.rule,
        "speculative_options": speculative_options or None,
    }
    settings = {  # what makes the outputs what they are: a resumed job must not change them
        "command": "generate",
        "speculative": speculative,
        "speculative_options": {k: repr(v) for k, v in speculative_options.items()},
        "acceptance": repr(spec.rule),
        "num_draft_tokens": num_draft_tokens,
        **sampling_args,
        "seed": args.seed,
        "batch_size": args.batch_size,
        # The head drafts, so it decides which draws are made: another head (or the same folder
        # retrained) gives other images. Recorded only when given, so older job.json files still match.
        **({"eagle_head": _folder_identity(args.eagle_head)} if getattr(args, "eagle_head", None) else {}),
    }
    summary = {
        "command": "generate",
        "speculative": speculative,
        "acceptance": spec.rule.name,
        "acceptance_options": acceptance_options,
        "acceptance_rule": repr(spec.rule),  # resolved, e.g. variant="official"
        "speculative_options": {
            k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in speculative_options.items()
        },
        "num_draft_tokens": num_draft_tokens,
        **sampling_args,
        "device": str(device),
    }
    return CallSettings(call, settings, summary)


def class_ids(classes: str) -> list[int]:
    """``--classes`` (comma-separated class ids) as ints; ``ValueError`` naming the flag for other text."""
    try:  # "" splits into [""], which int() refuses too
        return [int(c) for c in classes.split(",")]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated class ids, got {classes!r}") from None


def eval_labels(classes: str | None, num_classes: int, num_images: int) -> list[int]:
    """The class label of each of ``num_images`` images of ``mmspec eval``: the ids of ``--classes`` (every
    class when not given) in turn; ``SystemExit`` for ids outside ``[0, num_classes)``."""
    pool = class_ids(classes) if classes else list(range(num_classes))
    bad = [c for c in pool if not 0 <= c < num_classes]
    if bad:
        raise SystemExit(f"error: --classes {bad} are outside [0, {num_classes})")
    return [pool[i % len(pool)] for i in range(num_images)]


def _folder_identity(folder: str) -> dict:
    """A weights folder's resolved path and the sha256 of its files (names and contents, in name order)."""
    import hashlib

    root = Path(folder).resolve()
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return {"path": str(root), "sha256": digest.hexdigest()}


@dataclass
class BatchRun:
    """What one generated batch shares between its items' records: the pipeline output's ``stats``,
    its ``seed``, wall ``seconds`` and the token ``grid`` ``(h, w)`` its stats lay out (heat-maps)."""

    stats: Any
    seed: int
    seconds: float
    grid: tuple[int, int]


def save_image_result(
    args: argparse.Namespace, batch: BatchRun, row: int, item: JobItem, image: Any, name: str, fields: dict
) -> dict:
    """Save the image of the batch's ``row`` as ``name`` in ``--output-dir`` (with ``--heatmaps``, also
    its acceptance heat-map) and return its job record: the file, ``fields`` (the item's input), the
    batch's seed, steps and time, the row's steps and accepted drafts."""
    from .jobs_io import save_image_atomic
    from .visualize import acceptance_heatmap

    stats = batch.stats
    save_image_atomic(image, args.output_dir / name)
    record = {
        "file": name,
        **fields,
        "seed": batch.seed,
        "batch_steps": stats.steps,
        "batch_seconds": batch.seconds,
        "row_steps": int(stats.row_steps[row]),
        "row_accepted": int(stats.row_accepted[row]),
    }
    if args.heatmaps:
        heat = f"{item.index:05d}_accept.png"
        source, step = stats.token_source[row].reshape(batch.grid), stats.token_step[row].reshape(batch.grid)
        save_image_atomic(acceptance_heatmap(source, step), args.output_dir / heat)
        record["heatmap"] = heat
    return record


def assets_dir() -> Path:
    """The folder of the embedded models (``mmspec/assets``)."""
    return Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class ModelChoice:
    """What ``--model`` resolved to: a family and a folder (None: the family's embedded default, or
    the family's own sources such as LlamaGen's ``--official-gpt``)."""

    family: GenerationFamily
    path: Path | None


def _folder_record(path: Path, file: Path) -> dict:
    """The JSON object in the model folder ``path``'s ``file``; ``SystemExit`` naming the file when it is
    not valid JSON or not an object (a damaged or hand-edited folder)."""
    try:
        record = read_json(file)
    except ValueError as err:
        raise SystemExit(f"error: --model {path}: {err}") from None
    if not isinstance(record, dict):
        raise SystemExit(f"error: --model {path}: {file} holds a JSON {type(record).__name__}, not an object")
    return record


def _family_of_folder(path: Path) -> GenerationFamily:
    families = load_families().values()
    index, config = path / "model_index.json", path / "config.json"
    if index.is_file():
        class_name = _folder_record(path, index).get("_class_name")
        for family in families:
            if family.pipeline_class == class_name:
                return family
        raise SystemExit(f"error: --model {path}: mmspec has no generation family for pipeline class {class_name!r}")
    if config.is_file():
        model_type = _folder_record(path, config).get("model_type")
        for family in families:
            if model_type in family.model_types:
                return family
        raise SystemExit(f"error: --model {path}: mmspec generate does not support model_type {model_type!r}")
    raise SystemExit(
        f"error: --model {path}: not a model folder (no model_index.json written by a pipeline's save_pretrained, "
        "and no transformers config.json)"
    )


def resolve_model(name: str | None, default_family: str = "llamagen") -> ModelChoice:
    """``--model``'s family and folder, read without loading any weights.

    ``name`` is None (``default_family``'s embedded default), a family name, the name of an
    embedded model, or a local folder. Anything else is a clear ``SystemExit`` (never a hub look-up).
    """
    families = load_families()
    if name is None or name in families:
        family = families[name or default_family]
        if family.embedded is None:
            raise SystemExit(f"error: --model {family.name}: this family has no embedded model; pass a model folder")
        return ModelChoice(family, assets_dir() / family.embedded)
    embedded = {f.embedded: f for f in families.values() if f.embedded}
    if name in embedded:
        return ModelChoice(embedded[name], assets_dir() / name)
    path = Path(name)
    if not path.is_dir():
        known = sorted(families) + sorted(embedded)
        raise SystemExit(f"error: --model {name}: no such folder, and not a model name (known: {', '.join(known)})")
    return ModelChoice(_family_of_folder(path), path)
