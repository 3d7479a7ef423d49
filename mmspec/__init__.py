"""mmspec: speculative decoding for multimodal generative models.

``from mmspec import LlamaGenPipeline, VLMPipeline, MARPipeline`` (or ``from mmspec.pipelines import ...``) loads a
pipeline on first use: ``import mmspec`` itself imports torch, never diffusers or transformers.

Layout. ``mmspec.kernels`` and ``mmspec.pipelines`` are the checkout's top-level ``kernels/`` and
``pipelines/`` folders (DESIGN.md §1). Neither has an ``__init__.py``: they are PEP 420 namespace
portions, so Python started in the checkout's root (``python -c``, ``python -m`` put it first on
``sys.path``) never lets them hide a regular package of the same name -- Hugging Face's ``kernels``,
which transformers >= 5.25 imports, or PyPI's ``pipelines``. Import kernels from their modules
(``mmspec.kernels.rejection``, ``mmspec.kernels.neighbourhood``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"

#: Pipeline classes importable from ``mmspec`` and ``mmspec.pipelines`` -> the module defining each.
_PIPELINES = {
    "LlamaGenPipeline": "mmspec.pipelines.llamagen.pipeline_llamagen",
    "VLMPipeline": "mmspec.pipelines.vlm.pipeline_vlm",
    "MARPipeline": "mmspec.pipelines.mar.pipeline_mar",
    "VideoPipeline": "mmspec.pipelines.video.pipeline_video",
    "LMPipeline": "mmspec.pipelines.lm.pipeline_lm",
}
#: Subpackages that live in top-level folders of the checkout (namespace portions, no __init__.py).
_TOP_LEVEL_FOLDERS = ("kernels", "pipelines")


def _mount_top_level_folders() -> None:
    """Make ``mmspec.kernels`` / ``mmspec.pipelines`` importable wherever Python cannot find them itself.

    An installed wheel holds them under ``mmspec/`` and the import system finds them there. An
    editable install maps them onto the checkout's top-level folders with setuptools' ``package-dir``,
    and setuptools' editable finder does not resolve a mapped subpackage without ``__init__.py``
    (pypa/setuptools#4943); a checkout put on ``sys.path`` by hand has no mapping at all. In both
    cases the folder sits next to this package's own folder: register it as the namespace package
    ``mmspec.<name>``, exactly what the import system builds for a namespace portion.
    """
    package = sys.modules[__name__]
    for name in _TOP_LEVEL_FOLDERS:
        fullname = f"{__name__}.{name}"
        if fullname in sys.modules or importlib.util.find_spec(fullname) is not None:
            continue
        folder = Path(__file__).resolve().parent.parent / name
        if not folder.is_dir():
            continue  # nothing to mount: importing the subpackage fails with the usual ModuleNotFoundError
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[fullname] = module
        setattr(package, name, module)


def _pipeline_class(module_name: str, name: str) -> type:
    """The pipeline class ``name`` (imports its pipeline module, and with it diffusers/transformers)."""
    if name not in _PIPELINES:
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PIPELINES[name]), name)


def __getattr__(name: str) -> type:
    """``mmspec.LlamaGenPipeline`` / ``mmspec.VLMPipeline``, imported on first access (PEP 562)."""
    return _pipeline_class(__name__, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PIPELINES])


def _export_pipelines(pipelines: ModuleType) -> None:
    """Give the namespace package ``mmspec.pipelines`` (no ``__init__.py`` to define them) the same lazy
    ``LlamaGenPipeline`` / ``VLMPipeline`` attributes, through its module-level ``__getattr__`` (PEP 562)."""
    pipelines.__getattr__ = lambda name: _pipeline_class(pipelines.__name__, name)
    pipelines.__dir__ = lambda: sorted([*vars(pipelines), *_PIPELINES])
    pipelines.__all__ = sorted(_PIPELINES)


_mount_top_level_folders()
_export_pipelines(importlib.import_module(f"{__name__}.pipelines"))  # a namespace package: imports nothing

# The acceptance rules register when mmspec.acceptance is imported (its last line), not here:
# `import mmspec` stays free of torch, so `mmspec --help` starts fast.
