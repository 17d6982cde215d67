"""Linear-time replacements for two graph edits of onnxruntime's static quantizer (onnxruntime 1.32).

On a decoder's static prefill graph (some 15,000 nodes) most of `quantize_static`'s time goes to two
helpers that are quadratic in the graph size (found with cProfile, onnxruntime 1.32.0):

* `MinMaxCalibrater.augment_graph` (calibrate.py): for every calibrated tensor it rebuilds a dict of all
  value_infos and scans the node list for the first consumer, then inserts into the middle of the
  protobuf node list; a QDQ build calls it twice per graph.
* `ONNXModel.replace_input_of_all_nodes` (onnx_model.py): one Python call per node per replaced
  tensor (millions of calls on such a graph).

The replacements produce the same tensors, names and output order. The augmented graph (used only to
collect ranges) gets its ReduceMin/ReduceMax nodes at the end of the node list instead of before each
tensor's first consumer, which is still a topological order. They are applied only inside
`linear_quantizer_edits()` and only to the onnxruntime versions checked here; a newer onnxruntime
keeps its own code.
"""

from __future__ import annotations

import contextlib
import uuid

import numpy as np

CHECKED_VERSIONS = ("1.32.",)


def _augment_graph(self):
    """MinMaxCalibrater.augment_graph of onnxruntime 1.32, with one value_info map and appended nodes."""
    import onnx
    from onnx import helper, numpy_helper

    tensors, _ = self.select_tensors_to_calibrate(self.model)
    reshape_shape_name = str(uuid.uuid4())
    self.model.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), reshape_shape_name))
    value_infos = {vi.name: vi for vi in self.model.graph.value_info}
    value_infos.update({o.name: o for o in self.model.graph.output})
    value_infos.update({i.name: i for i in self.model.graph.input})
    opset = None
    for opset_import in self.model.opset_import:
        if opset_import.domain in ("", "ai.onnx"):
            opset = opset_import.version

    nodes, outputs = [], []
    for tensor_name in tensors:
        if tensor_name not in value_infos:
            raise ValueError(f"Unable to guess tensor type for tensor {tensor_name!r}, "
                             "running shape inference before quantization may resolve this issue.")
        onnx_type = value_infos[tensor_name].type.tensor_type.elem_type
        for reduce_op_name in ("ReduceMin", "ReduceMax"):
            reduce_output = tensor_name + "_" + reduce_op_name
            intermediate_output = reduce_output + "_Reshape"
            reduce_node = helper.make_node(reduce_op_name, [tensor_name], [intermediate_output], keepdims=1, name=reduce_output)
            if self.per_channel:
                rank = len(value_infos[tensor_name].type.tensor_type.shape.dim)
                axes = [0, *range(2, rank)]
                if opset is not None and opset < 18:
                    reduce_node.attribute.append(helper.make_attribute("axes", axes))
                else:
                    axes_name = str(uuid.uuid4())
                    self.model.graph.initializer.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
                    reduce_node.input.append(axes_name)
            nodes.append(reduce_node)
            nodes.append(helper.make_node("Reshape", [intermediate_output, reshape_shape_name], [reduce_output],
                                          name=intermediate_output))
            outputs.append(helper.make_tensor_value_info(reduce_output, onnx_type, [None]))
    self.model.graph.node.extend(nodes)
    self.model.graph.output.extend(outputs)
    onnx.save(self.model, self.augmented_model_path, save_as_external_data=self.use_external_data_format)


def _replace_input_of_all_nodes(self, old_input_name, new_input_name):
    """ONNXModel.replace_input_of_all_nodes, testing membership in C before the per-node Python call."""
    for node in self.model.graph.node:
        if old_input_name in node.input:
            for j, name in enumerate(node.input):
                if name == old_input_name:
                    node.input[j] = new_input_name


@contextlib.contextmanager
def linear_quantizer_edits():
    """Swap the two quadratic helpers for the duration of a quantization (checked onnxruntime versions only)."""
    import onnxruntime
    from onnxruntime.quantization.calibrate import MinMaxCalibrater
    from onnxruntime.quantization.onnx_model import ONNXModel

    if not onnxruntime.__version__.startswith(CHECKED_VERSIONS):
        yield False
        return
    saved = MinMaxCalibrater.augment_graph, ONNXModel.replace_input_of_all_nodes
    MinMaxCalibrater.augment_graph = _augment_graph
    ONNXModel.replace_input_of_all_nodes = _replace_input_of_all_nodes
    try:
        yield True
    finally:
        MinMaxCalibrater.augment_graph, ONNXModel.replace_input_of_all_nodes = saved
