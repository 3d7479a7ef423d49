"""mmspec: speculative decoding for multimodal generative models."""

__version__ = "0.1.0"


def _check_source_tree_not_on_path() -> None:
    """A clear error instead of transformers' cryptic one when Python runs from the root of an
    mmspec checkout (``python -m ...`` / ``python -c`` put the working directory first on
    ``sys.path``): there the repository's ``kernels/`` folder (installed as ``mmspec.kernels``) hides
    Hugging Face's ``kernels`` package, which transformers >= 5.25 imports whenever it is installed."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # nothing to hide
    found = importlib.util.find_spec("kernels")
    if found is None or found.origin is None:
        return
    expected = Path(installed.locate_file("kernels/__init__.py")).resolve()
    if Path(found.origin).resolve() != expected:
        raise ImportError(
            f"{Path(found.origin).parent} hides the installed `kernels` package ({expected.parent}), which "
            "transformers imports; in an mmspec checkout this happens when Python starts in the repository's root "
            "(`python -m ...` or `python -c` put it on sys.path). Run from another directory, use the installed "
            "entry points (`mmspec ...`, `pytest`), or start Python with -P (Python >= 3.11)."
        )


_check_source_tree_not_on_path()

# The relaxed acceptance rules ("lantern", "gsd") register when mmspec.acceptance is imported (its
# last line), not here: `import mmspec` stays free of torch, so `mmspec --help` starts fast.
