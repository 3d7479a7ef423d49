"""Image inputs given on the command line: a folder of images or a list file (used by the batch
jobs of :mod:`mmspec.app.jobs` and by :mod:`mmspec.training.vlm`'s ``--images``)."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def image_list(inputs: Path) -> list[str]:
    """Image paths from a folder (sorted, by extension) or a list file (one path per line, relative
    to the file's folder unless absolute; ``#`` comments and blank lines skipped)."""
    inputs = Path(inputs)
    if inputs.is_dir():
        return sorted(str(p) for p in inputs.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if inputs.is_file():
        base = inputs.parent
        return [
            str(Path(line.strip()) if Path(line.strip()).is_absolute() else base / line.strip())
            for line in inputs.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
    raise FileNotFoundError(f"{inputs}: no such folder or list file")
