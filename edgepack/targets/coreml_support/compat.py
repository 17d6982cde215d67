"""Every compatibility fix edgepack applies to coremltools, in one place.

Each fix names the upstream issue and the versions it applies to, and is applied only when those
versions are installed, so a coremltools release that fixes it upstream makes the patch a no-op.
`apply()` is idempotent and returns the list of fixes applied (written into target.json).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

_APPLIED: list[str] = []


def quiet() -> None:
    """coremltools logs import-time warnings on Linux (no libcoremlpython) and for untested torch versions."""
    for name in ("coremltools", "coremltools.converters", "coremltools.models"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="coremltools")
    warnings.filterwarnings("ignore", message=".*has not been tested with coremltools.*")


def apply() -> list[str]:
    if _APPLIED:
        return list(_APPLIED)
    quiet()
    import coremltools as ct
    import numpy as np

    ct_version = tuple(int(p) for p in ct.__version__.split(".")[:2])
    np_version = tuple(int(p) for p in np.__version__.split(".")[:2])

    # coremltools 9.0 + numpy >= 2.4: `_cast` (torch `aten::Int`/`aten::Bool` on a folded constant) calls
    # int() on a shape-(1,) array, which numpy 2.4 turned into a TypeError. apple/coremltools#2633,
    # fixed upstream by apple/coremltools#2632 (after 9.0). Hit by `q_len = input_ids.shape[1]` in tracing.
    if ct_version <= (9, 0) and np_version >= (2, 4):
        _patch_cast()
        _APPLIED.append("torch _cast: int()/bool() of a shape-(1,) constant (coremltools#2633, ct 9.0, numpy>=2.4)")

    # coremltools 9.0 + torch >= 2.8: `aten::alias` (emitted for views of buffers by newer torch tracing
    # and torch.export) has no converter: "PyTorch convert function for op 'alias' not implemented".
    # It is the identity; registered as such. Seen with torch 2.13 (coremltools tests torch <= 2.7).
    if ct_version <= (9, 0):
        if _register_alias():
            _APPLIED.append("torch aten::alias as identity (unsupported in ct 9.0 with torch>=2.8)")

    # coremltools 9.0: the fp16 cast pass (`add_fp16_cast`) checks every fp32 weight for fp16 overflow with
    # `abs_value[np.where(abs_value < 1e38)]`: np.where returns one int64 index array per dimension, so a
    # 2-D weight costs ~9x its fp32 bytes at once (a 128k x 2048 embedding table: 9 GB), and its underflow
    # check copies each weight (`len(val.flatten())`) only to count it. Same decisions, checked in chunks;
    # and each fp32 weight's pages are released once the pass has its fp16 copy (_release_pages).
    if ct_version <= (9, 0):
        _patch_fp16_cast_checks()
        _APPLIED.append("fp16 cast pass: overflow/underflow checks in bounded memory, fp32 pages released after the fp16 copy (ct 9.0)")
    return list(_APPLIED)


_CHUNK = 1 << 20  # elements per step of the chunked fp16 range check


def _fp16_overflows(value) -> bool:
    """Whether a finite-range value (|x| < 1e38; larger ones are infinities for this purpose) exceeds fp16's
    maximum: coremltools 9.0's test, `max(|x| where |x| < 1e38) > 65504`, read a chunk at a time."""
    import numpy as np

    flat = np.ravel(np.asarray(value))
    for start in range(0, flat.size, _CHUNK):
        chunk = np.abs(flat[start:start + _CHUNK])
        if np.any((chunk > 65504) & (chunk < 1e38)):
            return True
    return False


_MADV_PAGEOUT = 21  # Linux >= 5.4; not in Python's mmap module constants


def _release_pages(value) -> None:
    """Hand an fp32 weight's pages back to the kernel once the fp16 pass has copied it.

    coremltools holds the traced PyTorch model, whose weights are memory-mapped safetensors, for the whole
    conversion, so every fp32 page the conversion reads stays resident next to the fp16 program (1.5x the
    fp32 model). MADV_PAGEOUT reclaims the pages without changing what they hold: a file-backed page is
    read again from the file if anything touches it, an anonymous one (no swap) is left as it is. No
    library offers this: PyTorch and coremltools both keep a tensor's pages until it is freed."""
    import ctypes
    import mmap

    import numpy as np

    if not isinstance(value, np.ndarray) or value.nbytes < (1 << 20) or not hasattr(ctypes, "CDLL"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    page = mmap.PAGESIZE
    start = -(-value.ctypes.data // page) * page
    end = (value.ctypes.data + value.nbytes) // page * page
    if end > start and hasattr(libc, "madvise"):
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)  # a hint: failure leaves the pages


def _patch_fp16_cast_checks() -> None:
    import numpy as np
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    if getattr(FP16ComputePrecision, "_edgepack_bounded", False):
        return

    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else (inputs,):
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                    if _fp16_overflows(var.op.val.val):
                        return True
        return False

    original_underflow = FP16ComputePrecision._check_underflow_to_zero

    def check_underflow_to_zero(self, new_var, var):
        # Called once per fp32 value right after its fp16 copy is made. 9.0 looks only at values of fewer
        # than 400 elements: skip larger ones without copying them.
        if var.val is not None and np.size(var.val) >= 400:
            _release_pages(var.val)
            return
        original_underflow(self, new_var, var)

    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)
    FP16ComputePrecision._check_underflow_to_zero = check_underflow_to_zero
    FP16ComputePrecision._edgepack_bounded = True


def _patch_cast() -> None:
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops

    original = ops._cast

    def _cast(context, node, dtype, dtype_name):
        inputs = ops._get_inputs(context, node, expected=1)
        x = inputs[0]
        if x.can_be_folded_to_const() and isinstance(x.val, np.ndarray) and x.val.size == 1:
            context.add(mb.const(val=dtype(x.val.reshape(()).item()), name=node.name), node.name)
            return
        original(context, node, dtype, dtype_name)

    ops._cast = _cast


def _register_alias() -> bool:
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    if "alias" in _TORCH_OPS_REGISTRY.name_to_func_mapping:
        return False

    @register_torch_op
    def alias(context, node):
        inputs = ops._get_inputs(context, node, min_expected=1)
        context.add(inputs[0], node.name)

    return True


def make_package_reproducible(package: Path) -> None:
    """Rewrite the two parts of a saved .mlpackage that differ run to run, keeping their meaning.

    Not a patch of coremltools (applied after `MLModel.save`, whatever the version): coremltools 9.0 names
    the package items with random uuid4s (Manifest.json) and serializes the model spec's protobuf maps in
    hash order (model.mlmodel), so two conversions of the same model gave different bytes. Item identifiers become uuid5 of the item path and the spec is re-serialized
    deterministically (sorted map keys).
    """
    import json
    import uuid

    from coremltools.proto import Model_pb2

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "edgepack:" + item["path"])) for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[old]: item for old, item in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed.get(manifest["rootModelIdentifier"], manifest["rootModelIdentifier"])
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    for item in manifest["itemInfoEntries"].values():
        spec_path = package / "Data" / item["path"]
        if spec_path.suffix == ".mlmodel" and spec_path.is_file():
            spec = Model_pb2.Model()
            spec.ParseFromString(spec_path.read_bytes())
            spec_path.write_bytes(spec.SerializeToString(deterministic=True))
