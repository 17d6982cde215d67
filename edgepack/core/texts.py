"""The texts quality is measured on: the bundled calibration and evaluation texts, or a user's file.

Both bundled texts were written for edgepack and ship under its licence (Apache-2.0) as package data in
edgepack/quantize/data/; reports name them by that path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from edgepack.errors import BadInputError

CALIBRATION_TEXT = "calib_en.txt"
EVAL_TEXT = "eval_en.txt"
BUNDLED_DIR = "edgepack/quantize/data"
BUNDLED_TEXT_ORIGIN = f"written for edgepack, shipped in {BUNDLED_DIR}/ (Apache-2.0)"


def bundled_text(name: str) -> str:
    """The bundled text file `name` (CALIBRATION_TEXT or EVAL_TEXT)."""
    return resources.files("edgepack.quantize").joinpath("data", name).read_text(encoding="utf-8")


def text_label(path: Path | None, name: str) -> str:
    """How reports name a text: the user's path, or the bundled file's path in the package."""
    return str(path) if path else f"{BUNDLED_DIR}/{name}"


def _read(path: Path | None, default_name: str) -> tuple[str, str]:
    """(text, origin) from a user file or the bundled default; empty files are refused."""
    if path is None:
        return bundled_text(default_name), f"{text_label(None, default_name)}: {BUNDLED_TEXT_ORIGIN}"
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise BadInputError(f"{path} is empty: calibration and evaluation need real text")
    return text, str(path)


def calibration_text(path: Path | None = None) -> tuple[str, str]:
    """(text, origin) to calibrate on: `path`, or the bundled calibration text."""
    return _read(path, CALIBRATION_TEXT)


def eval_text(path: Path | None = None) -> tuple[str, str]:
    """(text, origin) to evaluate on: `path`, or the bundled evaluation text."""
    return _read(path, EVAL_TEXT)
