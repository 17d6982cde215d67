"""Helpers of the QNN target (`edgepack target qnn`): graph surgery, QDQ quantization, the QNN EP, the static runner.

Imported only inside `edgepack.targets.qnn.build`: they pull in onnx, onnxruntime and numpy.
"""
