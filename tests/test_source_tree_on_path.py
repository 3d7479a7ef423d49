"""Python started in the checkout's root (``python -c``, ``python -m`` put it first on ``sys.path``) imports
mmspec, transformers and Hugging Face's ``kernels`` normally: the top-level ``kernels/`` and ``pipelines/``
folders are namespace portions (no ``__init__.py``), which lose to a regular package of the same name."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

IMPORTS = """
import sys
from pathlib import Path
import mmspec
heavy = sorted(name for name in ("diffusers", "transformers") if name in sys.modules)
assert not heavy, f"import mmspec imported {heavy}"
assert sys.path[0] in ("", str(Path.cwd())), sys.path[:2]  # the working directory comes first
import transformers
from mmspec.kernels.neighbourhood import lantern_neighbour_mass
from mmspec.kernels.rejection import chain_rejection_sample
import mmspec.pipelines.llamagen
import mmspec.pipelines.vlm
from mmspec import LlamaGenPipeline, VLMPipeline
from mmspec.pipelines import LlamaGenPipeline as L, VLMPipeline as V
assert (L, V) == (LlamaGenPipeline, VLMPipeline)
assert LlamaGenPipeline is mmspec.pipelines.llamagen.LlamaGenPipeline
assert VLMPipeline is mmspec.pipelines.vlm.VLMPipeline
assert Path(mmspec.kernels.rejection.__file__).parent.name == "kernels"
print("ok")
"""


def _python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args, "-c", code], check=False, cwd=cwd, capture_output=True, text=True, timeout=180
    )


@pytest.mark.parametrize("where", ["checkout root", "elsewhere"])
def test_mmspec_imports_from_any_working_directory(where, tmp_path):
    run = _python(IMPORTS, REPO if where == "checkout root" else tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok"


def test_huggingface_kernels_is_not_hidden_by_the_checkout():
    """``import kernels`` in the checkout's root gets the installed Hugging Face package (what
    transformers >= 5.25 imports), not the repository's ``kernels/`` folder."""
    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    run = _python("import kernels; print(kernels.__file__)", REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Path(run.stdout.strip()).resolve() == Path(installed.locate_file("kernels/__init__.py")).resolve()


def test_the_top_level_folders_are_not_regular_packages():
    """A regular package (``__init__.py``) found in the working directory would win over every
    installed package of that name again."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert not (REPO / "pipelines" / "__init__.py").exists()


def test_transformers_and_kernels_import_here():
    """Run in-process by the suite, and by pytest started in the checkout's root below."""
    import transformers  # noqa: F401

    import kernels

    assert kernels.__file__ is None or Path(kernels.__file__).resolve().parent != REPO / "kernels"


def test_pytest_runs_from_the_checkout_root():
    """``python -m pytest`` in the root, in pytest's default import mode, which puts the root itself on
    ``sys.path`` (the project's configuration uses ``--import-mode=importlib``; ``-o addopts=`` drops it)."""
    test = f"{Path(__file__).relative_to(REPO)}::test_transformers_and_kernels_import_here"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", test],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout


def test_unknown_attributes_raise_attribute_error():
    import mmspec
    import mmspec.pipelines

    for module in (mmspec, mmspec.pipelines):
        with pytest.raises(AttributeError, match="has no attribute 'NoSuchPipeline'"):
            module.NoSuchPipeline  # noqa: B018
