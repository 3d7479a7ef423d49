"""Python started in the checkout's root puts its kernels/ folder on sys.path, hiding Hugging Face's
`kernels` package that transformers imports: importing mmspec there must say so clearly."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _import_mmspec(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import mmspec"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_import_in_the_checkout_root_names_the_problem(tmp_path):
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed: nothing to hide")
    assert _import_mmspec(tmp_path).returncode == 0
    run = _import_mmspec(REPO)
    assert run.returncode != 0
    assert "hides the installed `kernels` package" in run.stderr and "-P" in run.stderr
