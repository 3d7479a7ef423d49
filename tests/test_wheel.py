"""Build the wheel and import every module from it (not from the source tree)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_and_imports_every_module(tmp_path):
    # Build from a clean copy: setuptools builds in the source tree's build/ and packs whatever an
    # earlier build left in build/lib (a module since deleted or moved would ship again).
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "outputs", "results"
        ),
    )
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("mmspec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith(("pipelines/", "kernels/")) for n in names), (
        "pipelines/kernels must install under mmspec/"
    )
    # The top-level kernels/ and pipelines/ folders are namespace portions (no __init__.py, so they never
    # hide Hugging Face's `kernels` from the checkout root); their modules must still be in the wheel.
    assert {"mmspec/kernels/rejection.py", "mmspec/kernels/neighbourhood.py"} <= set(names)
    assert not {"mmspec/kernels/__init__.py", "mmspec/pipelines/__init__.py"} & set(names)
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py"))
    expected = {
        str(p.relative_to(REPO).with_suffix("")).replace("/", ".").removesuffix(".__init__")
        for root in ("mmspec", "pipelines", "kernels")
        for p in (REPO / root).rglob("*.py")
    }
    expected = {
        m.replace("pipelines", "mmspec.pipelines", 1)
        if m.startswith("pipelines")
        else m.replace("kernels", "mmspec.kernels", 1)
        if m.startswith("kernels")
        else m
        for m in expected
    }
    assert expected <= set(modules), f"missing from the wheel: {sorted(expected - set(modules))}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import importlib, sys\n"
        f"site = {str(site)!r}\n"
        f"for name in {modules!r}:\n"
        "    mod = importlib.import_module(name)\n"
        "    assert mod.__file__.startswith(site), (name, mod.__file__)\n"
        "import mmspec, mmspec.kernels.rejection as rejection\n"
        "assert [str(p) for p in mmspec.kernels.__path__] == [site + '/mmspec/kernels'], mmspec.kernels.__path__\n"
        "from mmspec.pipelines import LlamaGenPipeline, VLMPipeline\n"
        "assert LlamaGenPipeline is mmspec.LlamaGenPipeline and VLMPipeline.__module__ == 'mmspec.pipelines.vlm.pipeline_vlm'\n"
        "print('ok', len(sys.modules))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
