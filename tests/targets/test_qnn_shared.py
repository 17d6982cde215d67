"""The weight-shared context binary is compiled in a child process: its failures reach the build as errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

needs_qnn = pytest.mark.skipif(__import__("importlib").util.find_spec("onnxruntime_qnn") is None,
                               reason="onnxruntime-qnn is not installed")


def _matmul(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(256, dtype=np.float32).reshape(16, 16) / 256, "w")
    # Two nodes: a graph compiled into a shared binary gets a tag on an internal tensor's name (ep._model_source).
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@needs_qnn
def test_child_errors_reach_the_parent_with_their_exit_code(tmp_path):
    from edgepack.errors import UsageError
    from edgepack.targets.qnn_support.ep import HtpOptions, SharedCompile

    model = _matmul(tmp_path / "matmul.onnx")
    full = tmp_path / "full"
    full.mkdir()
    os.symlink("/dev/full", full / "matmul_ctx_qnn.bin")  # every write fails (ENOSPC)
    pending = SharedCompile([(model, full / "matmul_ctx.onnx")], HtpOptions(soc_model=57, htp_arch=75, fp16=True))
    with pytest.raises(UsageError, match=r"cannot write .*full/matmul_ctx\.onnx"):
        pending.result()
    assert not pending.process.is_alive()


@needs_qnn
def test_a_killed_child_is_an_error_not_a_hang(tmp_path):
    from edgepack.errors import BadInputError
    from edgepack.targets.qnn_support.ep import HtpOptions, SharedCompile

    model = _matmul(tmp_path / "matmul.onnx")
    pending = SharedCompile([(model, tmp_path / "matmul_ctx.onnx")], HtpOptions(soc_model=57, htp_arch=75, fp16=True))
    pending.process.kill()
    try:
        with pytest.raises(BadInputError, match="ended without a result"):
            pending.result()
    finally:
        pending.cancel()
