"""What a model folder can make go wrong during generation ends as one edgepack error line, never a traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgepack.errors import BadInputError, UsageError
from edgepack.runtime.generate import SamplingConfig, sample_next


def _copy_export(exported_tiny_factory, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(exported_tiny_factory("llama"), folder)
    return folder


def _poison_final_norm(folder) -> None:
    """Make every logit NaN: the final norm's weight scales every hidden state."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    norms = [init for init in model.graph.initializer if "norm" in init.name and len(init.dims) == 1]
    assert norms, [init.name for init in model.graph.initializer][:20]
    for init in norms:
        init.CopyFrom(numpy_helper.from_array(np.full(tuple(init.dims), np.nan, dtype=np.float32), init.name))
    onnx.save_model(model, str(folder / "model.onnx"))
    for data in folder.glob("model.onnx_data*"):
        data.unlink()


@pytest.mark.parametrize("logits", [[0.0, np.nan, 1.0], [0.0, np.inf, 1.0], [-np.inf, -np.inf, -np.inf]])
def test_sampling_non_finite_logits_is_bad_input(logits):
    with pytest.raises(BadInputError, match="not finite"):
        sample_next(np.array(logits, dtype=np.float32), SamplingConfig(temperature=1.0, seed=0), np.random.default_rng(0))


def test_sampling_skips_ruled_out_tokens_and_refuses_an_overflowing_temperature():
    rng = np.random.default_rng(0)
    logits = np.array([-np.inf, 2.0, -np.inf], dtype=np.float32)
    assert sample_next(logits, SamplingConfig(temperature=1.0), rng) == 1
    with pytest.raises(UsageError, match="temperature 1e-310 is too small"):
        sample_next(np.array([0.0, 5.0, 1.0], dtype=np.float32), SamplingConfig(temperature=1e-310), rng)


def test_run_of_a_model_with_nan_logits_is_exit_3(exported_tiny_factory, tmp_path, cli):
    folder = _copy_export(exported_tiny_factory, tmp_path)
    _poison_final_norm(folder)
    result = cli("run", folder, "-p", "hi", "-n", "2", "--temperature", "1", "--seed", "0")
    assert result.exit_code == 3, result.stderr
    assert len(result.stderr_lines) == 1 and "not finite" in result.stderr


@pytest.mark.parametrize("template, words", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{% for m in messages %}{{ m.content }", "chat template"),
])
def test_broken_chat_template_is_exit_3(exported_tiny_factory, tmp_path, cli, template, words):
    folder = _copy_export(exported_tiny_factory, tmp_path)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    result = cli("run", folder, "-p", "hi", "-n", "2")
    assert result.exit_code == 3, result.stderr
    assert len(result.stderr_lines) == 1 and words in result.stderr and "chat template" in result.stderr
    plain = cli("run", folder, "-p", "hi", "-n", "2", "--no-chat")  # the template is the only problem
    assert plain.exit_code == 0, plain.stderr


def test_a_target_of_a_model_whose_chat_template_fails_is_exit_3(exported_tiny_factory, tmp_path, cli):
    """The targets' tokenizer check renders the chat template too: a broken one is the model's fault, not a bug."""
    folder = _copy_export(exported_tiny_factory, tmp_path)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    result = cli("target", "ort-mobile", folder, "-o", tmp_path / "mobile")
    assert result.exit_code == 3, result.stderr
    assert len(result.stderr_lines) == 1 and "roles must alternate" in result.stderr and "chat template" in result.stderr
    assert not (tmp_path / "mobile").exists()
