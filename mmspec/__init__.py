"""mmspec: speculative decoding for multimodal generative models."""

__version__ = "0.1.0"


def _check_source_tree_not_on_path() -> None:
    """A clear error instead of transformers' cryptic one when Python runs from the root of an
    mmspec checkout (``python -m ...`` puts the working directory first on ``sys.path``): there the
    repository's ``kernels/`` folder (installed as ``mmspec.kernels``) hides Hugging Face's
    ``kernels`` package, which transformers >= 5.25 imports as soon as it is installed."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # nothing to hide
    found, ours = importlib.util.find_spec("kernels"), importlib.util.find_spec("mmspec.kernels")
    if found is None or ours is None or found.origin is None or ours.origin is None:
        return
    if Path(found.origin).resolve() == Path(ours.origin).resolve():
        raise ImportError(
            f"the mmspec source folder {Path(ours.origin).parent.parent} is on sys.path (Python was started there with "
            "`python -m` or `python -c`), so its kernels/ folder hides the installed `kernels` package that "
            "transformers imports. Run from another directory, use the installed entry points (`mmspec ...`, "
            "`pytest`), or start Python with -P."
        )


_check_source_tree_not_on_path()

from . import relaxed  # noqa: E402,F401  (registers the relaxed acceptance rules: "lantern", "gsd")
