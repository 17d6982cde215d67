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
    return list(_APPLIED)


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
