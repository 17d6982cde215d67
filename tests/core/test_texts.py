"""The bundled texts: one accessor for each, and the origin string reports carry."""

from __future__ import annotations

import pytest

from edgepack.core.texts import CALIBRATION_TEXT, EVAL_TEXT, bundled_text, calibration_text, eval_text, text_label
from edgepack.errors import BadInputError


def test_bundled_texts_and_their_origin():
    text, origin = eval_text()
    assert text == bundled_text(EVAL_TEXT) and len(text.split()) > 500
    assert origin == "edgepack/quantize/data/eval_en.txt: written for edgepack, shipped in edgepack/quantize/data/ (Apache-2.0)"
    text, origin = calibration_text(None)
    assert text == bundled_text(CALIBRATION_TEXT) and text != bundled_text(EVAL_TEXT)
    assert origin.startswith("edgepack/quantize/data/calib_en.txt: ")
    assert text_label(None, EVAL_TEXT) == "edgepack/quantize/data/eval_en.txt"


def test_user_texts(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("Some text to score.\n")
    assert eval_text(mine) == ("Some text to score.\n", str(mine)) and text_label(mine, EVAL_TEXT) == str(mine)
    (tmp_path / "blank.txt").write_text(" \n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    for name, words in (("blank.txt", "is empty"), ("latin1.txt", "not UTF-8"), ("absent.txt", "not found")):
        with pytest.raises(BadInputError, match=words):
            calibration_text(tmp_path / name)
