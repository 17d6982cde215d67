"""Read an ORT-format model (.ort, onnxruntime's flatbuffer) back into an ONNX ModelProto of its graph.

The result carries every node (op type, domain, inputs, outputs, attributes), the initializers' names,
types and shapes (not their values: `model_facts` costs a graph from shapes alone), the graph inputs and
outputs with their shapes, and the opsets. This lets `edgepack profile` project an `ort-mobile` bundle
from the graph it ships, which onnxruntime has already optimized and folded, instead of from the .onnx it
was converted from.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.errors import BadInputError


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _fbs():
    """onnxruntime's flatbuffers bindings of the ORT format. They are a top-level package only once
    `onnxruntime.tools.ort_format_model` has put their folder on sys.path, so that import must run first: a
    plain import block would be sorted the other way round."""
    import importlib

    import onnxruntime.tools.ort_format_model  # noqa: F401

    return importlib.import_module("ort_flatbuffers_py.fbs")


def _attribute(fb):
    from onnx import AttributeProto, helper

    fbs = _fbs()

    kind, name = fb.Type(), _text(fb.Name())
    types = fbs.AttributeType.AttributeType
    if kind == types.FLOAT:
        return helper.make_attribute(name, fb.F())
    if kind == types.INT:
        return helper.make_attribute(name, fb.I())
    if kind == types.STRING:
        return helper.make_attribute(name, fb.S())
    if kind == types.FLOATS:
        return helper.make_attribute(name, [fb.Floats(i) for i in range(fb.FloatsLength())], attr_type=AttributeProto.FLOATS)
    if kind == types.INTS:
        return helper.make_attribute(name, [fb.Ints(i) for i in range(fb.IntsLength())], attr_type=AttributeProto.INTS)
    if kind == types.STRINGS:
        return helper.make_attribute(name, [fb.Strings(i) for i in range(fb.StringsLength())], attr_type=AttributeProto.STRINGS)
    if kind == types.TENSOR and fb.T() is not None:
        return helper.make_attribute(name, _tensor(fb.T()))
    return None  # subgraphs and sparse tensors: not used by the per-token costs


def _tensor(fb):
    from onnx import TensorProto

    tensor = TensorProto(name=_text(fb.Name()), data_type=fb.DataType())
    tensor.dims.extend(fb.Dims(i) for i in range(fb.DimsLength()))
    return tensor


def _value_info(name: str, node_arg):
    from onnx import helper

    fbs = _fbs()

    info = helper.make_empty_tensor_value_info(name)
    kind = node_arg.Type() if node_arg is not None else None
    if kind is None or kind.ValueType() != fbs.TypeInfoValue.TypeInfoValue.tensor_type or kind.Value() is None:
        return info
    tensor = fbs.TensorTypeAndShape.TensorTypeAndShape()
    tensor.Init(kind.Value().Bytes, kind.Value().Pos)
    shape = tensor.Shape()
    dims = []
    for i in range(shape.DimLength() if shape is not None else 0):
        value = shape.Dim(i).Value()
        if value is None or value.DimType() == fbs.DimensionValueType.DimensionValueType.UNKNOWN:
            dims.append(None)
        elif value.DimType() == fbs.DimensionValueType.DimensionValueType.VALUE:
            dims.append(int(value.DimValue()))
        else:
            dims.append(_text(value.DimParam()))
    return helper.make_tensor_value_info(name, tensor.ElemType(), dims if shape is not None else None)


def read_ort_graph(path: Path | str):
    """An onnx.ModelProto with the .ort file's graph structure and initializer shapes (no weight values)."""
    from onnx import helper

    fbs = _fbs()
    path = Path(path)
    try:
        buffer = path.read_bytes()
        if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buffer, 0):
            raise ValueError("no ORT-format identifier")
        model = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buffer, 0).Model()
        graph = model.Graph()
        node_args = {_text(graph.NodeArgs(i).Name()): graph.NodeArgs(i) for i in range(graph.NodeArgsLength())}
        nodes = []
        for i in range(graph.NodesLength()):
            fb = graph.Nodes(i)
            node = helper.make_node(_text(fb.OpType()), [_text(fb.Inputs(j)) for j in range(fb.InputsLength())],
                                    [_text(fb.Outputs(j)) for j in range(fb.OutputsLength())], name=_text(fb.Name()),
                                    domain=_text(fb.Domain()) or None)
            node.attribute.extend(a for a in (_attribute(fb.Attributes(j)) for j in range(fb.AttributesLength())) if a is not None)
            nodes.append(node)
        inputs = [_text(graph.Inputs(i)) for i in range(graph.InputsLength())]
        initializers = [_tensor(graph.Initializers(i)) for i in range(graph.InitializersLength())]
        names = {t.name for t in initializers}
        onnx_graph = helper.make_graph(
            nodes, _text(path.stem),
            [_value_info(name, node_args.get(name)) for name in inputs if name not in names],
            [_value_info(_text(graph.Outputs(i)), node_args.get(_text(graph.Outputs(i)))) for i in range(graph.OutputsLength())],
            initializers)
        opsets = [helper.make_opsetid(_text(model.OpsetImport(i).Domain()), model.OpsetImport(i).Version())
                  for i in range(model.OpsetImportLength())]
        return helper.make_model(onnx_graph, opset_imports=opsets, ir_version=model.IrVersion())
    except Exception as exc:  # flatbuffers raise plain errors on a damaged file
        raise BadInputError(f"{path} is not a readable ORT-format model: {exc}") from None
