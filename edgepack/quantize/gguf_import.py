"""Lossless GGUF import: put a GGUF file's own quantized blocks into an ONNX decoder exported from it.

`edgepack convert model.gguf` dequantizes the GGUF to fp32 (transformers, `gguf_file=`) and exports that
with optimum-onnx. Quantizing the fp32 export again would quantize twice: the GGUF blocks are already
the quantized weights. `import_gguf_weights` instead finds, for every MatMul weight of the export (and
the Gather embedding, and the tied lm_head that optimum writes as `Transpose(embed_tokens)`), the GGUF
tensor it came from, and replaces the float weight by the GGUF blocks re-expressed in onnxruntime's
`com.microsoft` `MatMulNBits` / `GatherBlockQuantized` layout. Only the bit order changes; every weight
the new graph computes with equals the GGUF dequantization.

Why by hand: no library does this. onnxruntime-genai's model builder reads GGUF only to dequantize it
and then quantizes again with its own RTN/k-quant code; onnxruntime's MatMulNBitsQuantizer quantizes
float weights. Nothing maps GGML block formats onto MatMulNBits, so the block parsing below mirrors
`gguf.quants` (whose dequantizers we use as the reference and to match tensors) and stops before the
final multiply, keeping the integer codes.

How a GGUF tensor is found: by value, never by ONNX initializer name (TorchScript names them
`onnx::MatMul_1234`). transformers reverse-permutes the q/k rows of llama GGUFs, so a tensor is matched
as a multiset of rows (hash of each row's fp32 bytes) and the row permutation is recovered; the ONNX
MatMul weight is the transpose [K, N] of the GGUF/PyTorch [N, K] matrix. onnxruntime-genai's builder
graph (the `ort` target) fuses q/k/v into one MatMul: a weight that matches no single tensor is matched
as consecutive row blocks of whole tensors (`_find_fused`); tensors of one block form are stacked into
one MatMulNBits, mixed forms (Q4_K_M keeps attn_v at Q6_K) become one MatMulNBits per part and a Concat.
The builder also writes the tied embedding as Gather(Transpose(lm_head weight)); it shares the lm_head's blocks.

Block formats (w = one weight; see `_decompose`), as integer codes u with per-block scale s:
  Q4_0  w = d*(q-8)            -> 4-bit u = q, block 32, w = s*(u-8)
  Q4_1  w = d*q + m            -> 4-bit u = q, block 32, w = s*u + m
  Q5_0  w = d*(q-16)           -> 8-bit u = q+112, block 32, w = s*(u-128)
  Q5_1  w = d*q + m            -> 8-bit u = q+128, block 32, w = s*(u-128) + m
  Q8_0  w = d*q (q int8)       -> 8-bit u = q+128, block 32
  Q2_K  w = d*sc*q - dmin*mn   -> 4-bit, block 16, with a minimum
  Q3_K  w = d*(sc-32)*q        -> 4-bit u = q+8 (q in [-4, 3]), block 16
  Q4_K  w = d*sc*q - dmin*mn   -> 4-bit, block 32, with a minimum
  Q5_K  w = d*sc*q - dmin*mn   -> 8-bit u = q+128, block 32, with a minimum
  Q6_K  w = d*sc*(q-32)        -> 8-bit u = q+96, block 16
  F32/F16/BF16                 -> stay float MatMul / Gather
How they reach MatMulNBits (see `cpu_layout.pack_blocks`): onnxruntime 1.32's CPU MatMulNBits is fast only for 4-bit
weights with integer or default zero points; float zero points (the textbook form of Q4_1:
zp = -m/d) and 8-bit weights at accuracy_level 0 run 10-25x slower, slower than the fp32 MatMul
(measured). So 8-bit codes are split into two exact 4-bit planes (lo with scale s, hi with scale 16*s)
and a block minimum m is added as blocksum(A) @ m: block sums of the activations (A @ a 0/1 block indicator, shared per input) and a
small float MatMul with the [k_blocks, N] minimums. Every weight value stays exactly the GGUF's.

Storage: scales and minimums that are exact in fp16 (the GGUF's own fp16 d and m for Q4_0/Q4_1/Q8_0...)
are stored as fp16 and Cast to fp32 in the graph; zero-point tensors of 0 are ConstantOfShape.
onnxruntime constant-folds these at session creation, so MatMulNBits still sees constant inputs. This
keeps the file the size of the GGUF (fp32 scales and minimums would add one bit a weight to a
32-weight Q4_1 block's five).

Embedding and tied lm_head are stored once: the lm_head MatMulNBits B tensor [V, k_blocks, blob] is
also the `data` of GatherBlockQuantized (gather_axis 0, quantize_axis 2, scales reshaped to
[V, k_blocks, 1]); both read the same scale tensor (one GatherBlockQuantized per plane, summed). This
is onnxruntime-genai's tied-embedding scheme (GatherBlockQuantized sharing the lm_head's MatMulNBits
weight) without its Reshape of the big tensor, which onnxruntime would constant-fold into a second
copy. Formats with a block minimum gather the minimums too and add them (GatherBlockQuantized has no
float zero points).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgepack.errors import BadInputError
from edgepack.quantize.cpu_layout import Blocks as _Blocks
from edgepack.quantize.cpu_layout import GraphEdit as _Graph
from edgepack.quantize.cpu_layout import Packed as _Packed
from edgepack.quantize.cpu_layout import gather_block_quantized_nodes as _gather_block_quantized
from edgepack.quantize.cpu_layout import matmul_nbits_nodes as _matmul_nbits
from edgepack.quantize.cpu_layout import offset_column_nodes_for_blocks as _offset_column_nodes
from edgepack.quantize.cpu_layout import pack_blocks as _pack

# What each supported GGML type becomes: (bits, block_size). Codes are unsigned, one per weight.
_FORMATS = {
    "Q4_0": (4, 32),
    "Q4_1": (4, 32),
    "Q5_0": (8, 32),
    "Q5_1": (8, 32),
    "Q8_0": (8, 32),
    "Q2_K": (4, 16),
    "Q3_K": (4, 16),
    "Q4_K": (4, 32),
    "Q5_K": (8, 32),
    "Q6_K": (8, 16),
}
_FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_GGUF_TYPES = tuple(_FORMATS) + _FLOAT_TYPES
_4BIT_WITH_MINIMUM = ("Q4_1", "Q4_K", "Q2_K")  # w = s*u + m with 4-bit codes u (see `_decompose`)
# Requantization of types that cannot be expressed exactly (allow_requantize): onnxruntime RTN.
_REQUANT_BITS, _REQUANT_BLOCK = 4, 32


@dataclass
class GgufImportResult:
    onnx_in: Path
    gguf_file: Path
    onnx_out: Path
    gguf_types: dict[str, int] = field(default_factory=dict)  # GGUF tensors used in the graph, per type
    matmuls_replaced: int = 0  # MatMul nodes now MatMulNBits (lm_head included)
    matmuls_kept_float: list[str] = field(default_factory=list)  # from F32/F16/BF16 GGUF tensors
    unmatched: list[str] = field(default_factory=list)  # float weights with no GGUF counterpart (left as is)
    requantized: list[dict] = field(default_factory=list)
    fused: list[dict] = field(default_factory=list)  # MatMuls whose weight stacks several GGUF tensors (fused q/k/v)
    embedding: dict = field(default_factory=dict)
    lm_head: dict = field(default_factory=dict)
    # accuracy_level 4: weights with a block minimum written as integer zero points + residue columns
    offset_columns: int = 0
    offset_columns_max_rel_error: float = 0.0  # max |w_written - w_gguf| / max |w_gguf| over those weights
    bytes: int = 0  # size of onnx_out (+ external data, if any)
    bytes_in: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("onnx_in", "gguf_file", "onnx_out"):
            data[key] = str(data[key])
        data["kind"] = "edgepack.gguf_import"
        data["size_ratio"] = round(self.bytes / self.bytes_in, 4) if self.bytes_in else None
        data["seconds"] = round(self.seconds, 3)
        return data


def source_gguf(export_dir: Path) -> Path | None:
    """The GGUF an `edgepack convert` output folder was made from (convert.json `source.gguf_file`), if any."""
    import json

    report = Path(export_dir) / "convert.json"
    if not report.is_file():
        return None
    gguf_file = (json.loads(report.read_text()).get("source") or {}).get("gguf_file")
    return Path(gguf_file) if gguf_file else None


# ----------------------------------------------------------------------------------------------
# GGML blocks -> (codes, scales, zero points / offsets)
# ----------------------------------------------------------------------------------------------


def _f16(raw: np.ndarray) -> np.ndarray:
    """fp16 bytes (last axis of 2) -> float32, shape without the last axis."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _split(blocks: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.hsplit(blocks, np.cumsum(sizes)[:-1].tolist())


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """GGML 32-element nibble layout: byte j holds element j (low) and element j+16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian uint32 qh is the 5th bit of element j."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _decompose(gguf_type: str, raw: np.ndarray, cols: int) -> _Blocks:
    """Parse GGML blocks (raw uint8 [rows, bytes_per_row]) into integer codes and per-block scales.

    Mirrors gguf.quants.<TYPE>.dequantize_blocks, keeping the integer part apart from the scale.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    qk, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[gguf_type]]
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(-1, type_size)  # one GGML block per row
    bits, block = _FORMATS[gguf_type]
    if gguf_type not in _BLOCK_PARSERS:  # pragma: no cover - guarded by _FORMATS
        raise AssertionError(gguf_type)
    codes, scale, offset = _BLOCK_PARSERS[gguf_type](gguf_type, b)
    nb_row = cols // block
    return _Blocks(
        gguf_type,
        bits,
        block,
        codes.astype(np.uint8).reshape(rows, cols),
        scale.astype(np.float32).reshape(rows, nb_row),
        None if offset is None else offset.astype(np.float32).reshape(rows, nb_row),
    )


# Each parser: GGML blocks (one per row of `b`) -> (codes, scale per block, offset per block or None).


def _legacy_blocks(gguf_type: str, b: np.ndarray):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: one fp16 scale (and minimum) per block of 32."""
    offset = None
    if gguf_type == "Q4_0":
        d, qs = _split(b, [2, 16])
        codes, scale = _nibbles32(qs), _f16(d)
    elif gguf_type == "Q4_1":
        d, m, qs = _split(b, [2, 2, 16])
        codes, scale, offset = _nibbles32(qs), _f16(d), _f16(m)
    elif gguf_type in ("Q5_0", "Q5_1"):
        if gguf_type == "Q5_0":
            d, qh, qs = _split(b, [2, 4, 16])
        else:
            d, m, qh, qs = _split(b, [2, 2, 4, 16])
            offset = _f16(m)
        q = _nibbles32(qs) | (_high_bits32(qh) << 4)  # 0..31
        # Q5_0: w = d*(q-16) = d*((q+112) - 128); Q5_1: w = d*q + m = d*((q+128) - 128) + m.
        codes, scale = q + (112 if gguf_type == "Q5_0" else 128), _f16(d)
    else:  # Q8_0
        d, qs = _split(b, [2, 32])
        codes, scale = qs ^ 0x80, _f16(d)  # int8 q -> uint8 q + 128
    return codes, scale, offset


def _q2_k_blocks(gguf_type: str, b: np.ndarray):
    n = b.shape[0]
    sc, qs, d, dmin = _split(b, [16, 64, 2, 2])
    scale = _f16(d)[:, None] * (sc & 0x0F).astype(np.float32)
    offset = -(_f16(dmin)[:, None] * (sc >> 4).astype(np.float32))
    shift = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = ((qs.reshape(n, -1, 1, 32) >> shift) & 3).reshape(n, 256)
    return codes, scale, offset


def _q3_k_blocks(gguf_type: str, b: np.ndarray):
    n = b.shape[0]
    hmask, qs, sc, d = _split(b, [32, 64, 12, 2])
    lsc, hsc = np.hsplit(sc, [8])
    lsc = (lsc.reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    hsc = (hsc.reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    sc6 = (lsc & 0x0F) | ((hsc & 0x03) << 4)
    scale = _f16(d)[:, None] * (sc6.astype(np.int8) - np.int8(32)).astype(np.float32)
    ql = qs.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = hmask.reshape(n, -1, 1, 32) >> np.array(range(8), dtype=np.uint8).reshape(1, 1, 8, 1)
    ql = ql.reshape(n, 16, 16) & 3
    qh = (qh.reshape(n, 16, 16) & 1) ^ 1  # the -4 offset applies when the mask bit is 0
    q = ql.astype(np.int8) - (qh << 2).astype(np.int8)  # -4..3
    codes = (q + 8).astype(np.uint8).reshape(n, 256)
    return codes, scale, None


def _q4_5_k_blocks(gguf_type: str, b: np.ndarray):
    """Q4_K and Q5_K: 6-bit scales and minimums per block of 32 (Q5_K adds a fifth bit plane)."""
    from gguf.quants import Q4_K

    n = b.shape[0]
    if gguf_type == "Q4_K":
        d, dmin, sc, qs = _split(b, [2, 2, 12, 128])
    else:
        d, dmin, sc, qh, qs = _split(b, [2, 2, 12, 32, 128])
    sc6, mn6 = Q4_K.get_scale_min(np.ascontiguousarray(sc))
    scale = _f16(d)[:, None] * sc6.astype(np.float32)
    offset = -(_f16(dmin)[:, None] * mn6.astype(np.float32))
    q = (qs.reshape(n, -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    q = q.reshape(n, 8, 32)
    if gguf_type == "Q5_K":
        h = (qh.reshape(n, -1, 1, 32) >> np.array(range(8), dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
        q = (q | (h.reshape(n, 8, 32) << 4)) + 128  # w = s*((q+128) - 128) + offset
    codes = q.reshape(n, 256)
    return codes, scale, offset


def _q6_k_blocks(gguf_type: str, b: np.ndarray):
    n = b.shape[0]
    ql, qh, sc, d = _split(b, [128, 64, 16, 2])
    scale = _f16(d)[:, None] * sc.view(np.int8).astype(np.float32)
    ql = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    qh = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = ql.reshape(n, -1, 32) | (qh.reshape(n, -1, 32) << 4)  # 0..63, w = s*(q-32)
    codes = (q + 96).reshape(n, 256)  # (q+96) - 128 = q - 32
    return codes, scale, None


_BLOCK_PARSERS = {
    "Q4_0": _legacy_blocks, "Q4_1": _legacy_blocks, "Q5_0": _legacy_blocks, "Q5_1": _legacy_blocks, "Q8_0": _legacy_blocks,
    "Q2_K": _q2_k_blocks, "Q3_K": _q3_k_blocks, "Q4_K": _q4_5_k_blocks, "Q5_K": _q4_5_k_blocks, "Q6_K": _q6_k_blocks,
}


def _requantize(values: np.ndarray, gguf_type: str) -> _Blocks:
    """onnxruntime's RTN block quantizer (what MatMulNBitsQuantizer runs by default), 4-bit asymmetric."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    rows, cols = values.shape
    quantizer = DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(block_size=_REQUANT_BLOCK, is_symmetric=False, bits=_REQUANT_BITS)
    )
    packed, scales, zero = quantizer.qbits_block_quant(np.ascontiguousarray(values.T))  # expects [K, N]
    nb = scales.shape[1]
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)[:, :cols]
    zero = np.stack([zero & 0x0F, zero >> 4], axis=-1).reshape(rows, -1)[:, :nb]
    if cols % _REQUANT_BLOCK:
        raise BadInputError(f"cannot requantize a weight of {cols} columns (not a multiple of {_REQUANT_BLOCK})")
    return _Blocks(f"{gguf_type}->RTN{_REQUANT_BITS}", _REQUANT_BITS, _REQUANT_BLOCK, codes, scales.astype(np.float32), None, zero)


# ----------------------------------------------------------------------------------------------
# Matching ONNX weights to GGUF tensors by value
# ----------------------------------------------------------------------------------------------


def _row_hashes(matrix: np.ndarray) -> list[int]:
    rows = np.ascontiguousarray(matrix, dtype=np.float32) + np.float32(0)  # -0.0 -> +0.0
    view = rows.view(np.uint8).reshape(rows.shape[0], -1)
    return [hash(r.tobytes()) for r in view]


def _signature(hashes: list[int]) -> int:
    return hash(tuple(sorted(hashes)))


@dataclass
class _GgufTensor:
    name: str
    gguf_type: str
    shape: tuple[int, int]  # (rows, cols) as PyTorch sees it: [out_features, in_features]
    raw: np.ndarray  # GGUFReader memmap: uint8 blocks or float values, [rows, ...]
    row_index: dict[int, list[int]]


def _index_gguf(reader, status) -> dict[int, list[_GgufTensor]]:
    """Dequantize every 2-D GGUF tensor once, only to hash its rows; keep the raw blocks."""
    from gguf.quants import dequantize

    by_signature: dict[int, list[_GgufTensor]] = defaultdict(list)
    for tensor in reader.tensors:
        if len(tensor.shape) != 2:
            continue
        gguf_type = tensor.tensor_type.name
        cols, rows = (int(x) for x in tensor.shape)  # GGUF lists ne0 (the row length) first
        try:
            values = dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols)
        except NotImplementedError:
            status(f"gguf cannot dequantize {tensor.name} ({gguf_type}); it cannot be matched")
            continue
        hashes = _row_hashes(values)
        index: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            index[h].append(i)
        by_signature[_signature(hashes)].append(
            _GgufTensor(tensor.name, gguf_type, (rows, cols), tensor.data, dict(index))
        )
    return by_signature


@dataclass
class _FusedTensor:
    """Several GGUF tensors stacked along rows (the model builder's fused q/k/v projection)."""

    name: str
    gguf_type: str
    shape: tuple[int, int]
    parts: list[tuple[_GgufTensor, np.ndarray]]  # (tensor, row permutation) in row order


def _find_fused(by_signature, weight_rows: np.ndarray) -> tuple[_FusedTensor, np.ndarray] | None:
    """`weight_rows` as consecutive row blocks, each a row permutation of one whole GGUF tensor of the same type."""
    tensors = [t for group in by_signature.values() for t in group if t.shape[1] == weight_rows.shape[1]]
    hashes = _row_hashes(weight_rows)
    parts: list[tuple[_GgufTensor, np.ndarray]] = []
    start = 0
    while start < len(hashes):
        for candidate in tensors:
            rows = candidate.shape[0]
            if hashes[start] not in candidate.row_index or start + rows > len(hashes):
                continue
            segment = weight_rows[start:start + rows]
            found = _find({_signature(hashes[start:start + rows]): [candidate]}, segment)
            if found is not None:
                parts.append(found)
                start += rows
                break
        else:
            return None
    if len(parts) < 2:
        return None  # one tensor is _find's job
    types = {t.gguf_type for t, _ in parts}
    fused = _FusedTensor("+".join(t.name for t, _ in parts), types.pop() if len(types) == 1 else "mixed", weight_rows.shape, parts)
    return fused, np.arange(len(hashes))


def _find(by_signature, weight_rows: np.ndarray) -> tuple[_GgufTensor, np.ndarray] | None:
    """The GGUF tensor whose rows are a permutation of `weight_rows`, and that permutation."""
    hashes = _row_hashes(weight_rows)
    for candidate in by_signature.get(_signature(hashes), []):
        if candidate.shape != weight_rows.shape:
            continue
        used: dict[int, int] = Counter()
        perm = np.empty(len(hashes), dtype=np.int64)
        for i, h in enumerate(hashes):
            rows = candidate.row_index[h]
            perm[i] = rows[used[h]]  # equal rows are interchangeable: take them in order
            used[h] += 1
        return candidate, perm
    return None


# ----------------------------------------------------------------------------------------------
# Graph surgery (shared with edgepack.quantize.cpu_layout)
# ----------------------------------------------------------------------------------------------


def _weight_sites(g: _Graph):
    """(kind, node, initializer name, rows-as-[N, K] loader) for every float weight we may replace."""
    from onnx import TensorProto, helper

    def is_float_2d(name):
        init = g.inits.get(name)
        return init is not None and init.data_type == TensorProto.FLOAT and len(init.dims) == 2

    for node in g.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            w = node.input[1]
            if is_float_2d(w):
                yield "matmul", node, w, True  # [K, N]: rows are columns
            elif w in g.producer and g.producer[w].op_type == "Transpose":
                t = g.producer[w]
                perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
                if is_float_2d(t.input[0]) and perm == [1, 0]:
                    yield "lm_head", node, t.input[0], False  # Transpose(E): E's rows are the output rows
        elif node.op_type == "Gather":
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            table = node.input[0]
            if axis != 0:
                continue
            if is_float_2d(table):
                yield "embedding", node, table, False
            elif table in g.producer and g.producer[table].op_type == "Transpose":
                # onnxruntime-genai's builder: Gather(Transpose(lm_head weight [H, V])) for a tied embedding
                t = g.producer[table]
                perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
                if is_float_2d(t.input[0]) and perm == [1, 0]:
                    yield "embedding", node, t.input[0], True


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def import_gguf_weights(
    onnx_in: Path,
    gguf_path: Path,
    onnx_out: Path,
    *,
    allow_requantize: bool = False,
    accuracy_level: int | None = None,
    on_status=None,
) -> GgufImportResult:
    """Replace the float weights of an ONNX decoder exported from `gguf_path` by that GGUF's quantized blocks.

    MatMul -> com.microsoft MatMulNBits, embedding Gather -> GatherBlockQuantized sharing the tied lm_head's
    blocks. Raises BadInputError for a GGUF type that has no exact MatMulNBits form, unless
    `allow_requantize` (then onnxruntime's RTN 4-bit quantizer is used for it and it is listed in the result).
    """
    import onnx

    status = on_status or (lambda message: None)
    onnx_in, gguf_path, onnx_out = Path(onnx_in), Path(gguf_path), Path(onnx_out)
    start = time.perf_counter()
    reader = _open_gguf(onnx_in, gguf_path)
    result = GgufImportResult(onnx_in, gguf_path, onnx_out, bytes_in=_model_bytes(onnx_in))

    status(f"indexing {len(reader.tensors)} GGUF tensors by value")
    by_signature = _index_gguf(reader, status)
    status(f"loading {onnx_in}")
    model = onnx.load(str(onnx_in))
    g = _Graph(model, const_prefix="gguf_import")

    matched = _match_weights(g, by_signature, result)
    if not matched:
        raise BadInputError(
            f"no weight of {onnx_in} matches a tensor of {gguf_path}: the ONNX model was not exported from this GGUF"
        )
    _refuse_inexact_types(matched, gguf_path, allow_requantize)  # before writing anything

    status(f"writing {len(matched)} GGUF tensors into the graph")
    writer = _WeightWriter(g, result, _GgufBlocks(result), accuracy_level)
    matched = _label_tied_lm_head(matched)
    writer.shared_tensors = {m.tensor.name for m in matched if m.kind in ("embedding", "lm_head")}
    for match in matched:
        writer.write(match)

    result.gguf_types = dict(Counter(writer.used_tensors.values()))
    g.finish(writer.removed)
    status(f"saving {onnx_out}")
    _save(model, onnx_out)
    from edgepack.quantize.graph import validate_with_onnxruntime

    validate_with_onnxruntime(onnx_out)  # a failure here is a bug, not the user's input
    result.bytes = _model_bytes(onnx_out)
    result.seconds = time.perf_counter() - start
    return result


def _open_gguf(onnx_in: Path, gguf_path: Path):
    """The GGUF reader, once both inputs exist and the GGUF parses (BadInputError otherwise)."""
    if not onnx_in.is_file():
        raise BadInputError(f"{onnx_in} does not exist")
    if not gguf_path.is_file():
        raise BadInputError(f"{gguf_path} does not exist")
    import gguf

    try:
        return gguf.GGUFReader(str(gguf_path))
    except Exception as exc:
        raise BadInputError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc


@dataclass(frozen=True)
class _Match:
    """A float weight of the graph and the GGUF tensor it came from."""

    kind: str  # "matmul", "embedding", or "lm_head" (see _label_tied_lm_head)
    node: object  # the MatMul or Gather node
    init_name: str  # its float weight initializer
    tensor: _GgufTensor | _FusedTensor
    perm: np.ndarray  # the weight's rows are the tensor's rows in this order
    transposed: bool  # the initializer is [K, N]: its columns are the tensor's rows


def _match_weights(g: _Graph, by_signature, result: GgufImportResult) -> list[_Match]:
    """Every weight site with its GGUF tensor, by value; sites with none go to `result.unmatched`."""
    matched = []
    for kind, node, init_name, transposed in list(_weight_sites(g)):
        weight = g.np.to_array(g.inits[init_name])
        rows = weight.T if transposed else weight
        found = _find(by_signature, rows)
        if found is None and kind == "matmul":
            found = _find_fused(by_signature, rows)
        if found is None:
            result.unmatched.append(f"{kind}:{node.name or init_name}")
            continue
        tensor, perm = found
        matched.append(_Match(kind, node, init_name, tensor, perm, transposed))
    return matched


def _parts(tensor) -> list:
    """(GGUF tensor, row permutation) of each part of a fused tensor; a plain tensor is its own one part."""
    return getattr(tensor, "parts", [(tensor, None)])


def _refuse_inexact_types(matched: list[_Match], gguf_path: Path, allow_requantize: bool) -> None:
    """BadInputError naming the matched tensors whose GGUF type has no exact MatMulNBits form (unless requantizing)."""
    parts = [p for m in matched for p, _ in _parts(m.tensor)]
    unsupported = sorted({(t.name, t.gguf_type) for t in parts if t.gguf_type not in SUPPORTED_GGUF_TYPES})
    if unsupported and not allow_requantize:
        listed = ", ".join(f"{name} ({kind})" for name, kind in unsupported)
        raise BadInputError(
            f"{gguf_path} has tensors whose GGUF type has no exact MatMulNBits form: {listed}; "
            f"supported: {', '.join(SUPPORTED_GGUF_TYPES)} (pass allow_requantize to requantize them with onnxruntime's RTN)"
        )


def _label_tied_lm_head(matched: list[_Match]) -> list[_Match]:
    """The builder writes a tied lm_head as a plain MatMul on [H, V] (and the embedding as Gather(Transpose)):
    a MatMul on the embedding's tensor is the lm_head."""
    embedding_tensors = {m.tensor.name for m in matched if m.kind == "embedding"}
    return [replace(m, kind="lm_head") if m.kind == "matmul" and m.tensor.name in embedding_tensors else m for m in matched]


class _GgufBlocks:
    """The integer blocks of each GGUF tensor, decomposed once; types without an exact form are requantized
    (onnxruntime RTN) and listed in `result.requantized`."""

    def __init__(self, result: GgufImportResult):
        self.result = result
        self.decomposed: dict[str, _Blocks] = {}

    def of(self, tensor: _GgufTensor) -> _Blocks:
        blocks = self.decomposed.get(tensor.name)
        if blocks is None:
            rows, cols = tensor.shape
            if tensor.gguf_type in _FORMATS:
                blocks = _decompose(tensor.gguf_type, np.asarray(tensor.raw), cols)
            else:
                import gguf
                from gguf.quants import dequantize

                qtype = gguf.GGMLQuantizationType[tensor.gguf_type]
                values = dequantize(np.asarray(tensor.raw), qtype).reshape(rows, cols)
                blocks = _requantize(values, tensor.gguf_type)
                self.result.requantized.append(
                    {"tensor": tensor.name, "gguf_type": tensor.gguf_type, "bits": _REQUANT_BITS, "block_size": _REQUANT_BLOCK, "method": "onnxruntime RTN (asymmetric)"}
                )
            self.decomposed[tensor.name] = blocks
        return blocks


class _WeightWriter:
    """Replaces matched weights in the graph: MatMulNBits / GatherBlockQuantized on the GGUF's blocks, each
    (tensor, row order) packed once and shared by its users; float GGUF tensors stay float ops."""

    def __init__(self, g: _Graph, result: GgufImportResult, blocks: _GgufBlocks, accuracy_level: int | None):
        self.g, self.result, self.blocks, self.accuracy_level = g, result, blocks, accuracy_level
        self.packed: dict[tuple[str, bytes], _Packed] = {}
        self.removed: set[str] = set()  # float initializers no longer used
        self.used_tensors: dict[str, str] = {}  # GGUF tensor name -> its type
        self.shared_tensors: set[str] = set()  # the embedding's and lm_head's tensors (packed once, shared)

    def write(self, match: _Match) -> None:
        kind, node, tensor = match.kind, match.node, match.tensor
        for part, _ in _parts(tensor):
            self.used_tensors[part.name] = part.gguf_type
        label = node.name or node.output[0]
        float_part = any(t.gguf_type in _FLOAT_TYPES for t, _ in getattr(tensor, "parts", []))
        if tensor.gguf_type in _FLOAT_TYPES or float_part:
            if kind != "embedding":
                self.result.matmuls_kept_float.append(label)
            _describe(self.result, kind, tensor, None, shared=False)
            return
        if isinstance(tensor, _FusedTensor):
            self._write_fused(match, label)
            return
        if kind != "embedding" and self._offset_columns(tensor):
            blocks = self.blocks.of(tensor)
            blocks = blocks if _is_identity(match.perm) else blocks.take_rows(match.perm)
            self._write_offset_columns(node, blocks, _safe(tensor.name))
            self.removed.add(match.init_name)
            return
        packed, shared = self._packed(match)
        if kind == "embedding":
            self.g.replacements[id(node)] = _gather_block_quantized(self.g, node, packed)
        else:
            self.g.replacements[id(node)] = _matmul_nbits(self.g, node, packed, self.accuracy_level)
            self.result.matmuls_replaced += 1
        self.removed.add(match.init_name)
        _describe(self.result, kind, tensor, packed, shared=shared)

    def _offset_columns(self, tensor) -> bool:
        """accuracy_level 4 writes 4-bit blocks with a minimum as offset columns (one MatMulNBits each); the
        tied lm_head keeps the packed form its embedding shares."""
        if self.accuracy_level != 4 or tensor.name in self.shared_tensors:
            return False
        return all(part.gguf_type in _4BIT_WITH_MINIMUM for part, _ in _parts(tensor))

    def _write_offset_columns(self, node, blocks: _Blocks, base: str) -> None:
        nodes, error = _offset_column_nodes(self.g, node, blocks, base)
        self.g.replacements[id(node)] = nodes
        self.result.matmuls_replaced += 1
        self.result.offset_columns += 1
        self.result.offset_columns_max_rel_error = max(self.result.offset_columns_max_rel_error, error)

    def _packed(self, match: _Match) -> tuple[_Packed, bool]:
        """The packed blocks of the match's tensor in its row order, and whether an earlier match packed them."""
        tensor, perm, g = match.tensor, match.perm, self.g
        key = (tensor.name, perm.tobytes() if not _is_identity(perm) else b"")
        packed = self.packed.get(key)
        if packed is not None:
            return packed, True
        blocks = self.blocks.of(tensor)
        blocks = blocks if _is_identity(perm) else blocks.take_rows(perm)
        if blocks.zero is None:
            # Exactness check: our codes and scales must give back the very weights in the ONNX graph.
            weight = g.np.to_array(g.inits[match.init_name])
            expected = weight.T if match.transposed else weight
            if not np.array_equal(blocks.dequantize(), expected):
                raise AssertionError(f"GGUF tensor {tensor.name} ({tensor.gguf_type}) does not reproduce {match.init_name} exactly")
        packed = _pack(g, blocks, _safe(tensor.name) + ("" if _is_identity(perm) else "_rowperm"), single_8bit=self.accuracy_level == 4)
        self.packed[key] = packed
        return packed, False

    def _write_fused(self, match: _Match, label: str) -> None:
        """A MatMul whose weight stacks several GGUF tensors (fused q/k/v)."""
        g, node, tensor, init_name, level = self.g, match.node, match.tensor, match.init_name, self.accuracy_level
        pieces = [self.blocks.of(t) if _is_identity(p) else self.blocks.of(t).take_rows(p) for t, p in tensor.parts]
        exact = all(b.zero is None for b in pieces)  # requantized parts only approximate the GGUF
        if exact and not np.array_equal(np.concatenate([b.dequantize() for b in pieces]), g.np.to_array(g.inits[init_name]).T):
            raise AssertionError(f"GGUF tensors {tensor.name} do not reproduce {init_name} exactly")
        one_matmul = _compatible(pieces)
        if one_matmul and self._offset_columns(tensor):
            self._write_offset_columns(node, _concat_rows(pieces), _safe(label + ".fused"))
        elif one_matmul:  # one MatMulNBits over the stacked blocks, as fast as the fused MatMul
            packed = _pack(g, _concat_rows(pieces), _safe(label + ".fused"), single_8bit=level == 4)
            g.replacements[id(node)] = _matmul_nbits(g, node, packed, level)
        else:  # mixed formats (Q4_K_M keeps attn_v at Q6_K): one MatMulNBits per part, outputs concatenated
            g.replacements[id(node)] = _split_matmul(g, node, [
                _pack(g, piece, _safe(t.name) + ("" if _is_identity(p) else "_rowperm"), single_8bit=level == 4)
                for piece, (t, p) in zip(pieces, tensor.parts)
            ], level)
        self.result.fused.append({"node": label, "gguf_tensors": [t.name for t, _ in tensor.parts], "one_matmul": one_matmul})
        self.result.matmuls_replaced += 1
        self.removed.add(init_name)


def _describe(result: GgufImportResult, kind: str, tensor: _GgufTensor, packed: _Packed | None, *, shared: bool) -> None:
    if kind not in ("embedding", "lm_head"):
        return
    info = {"gguf_tensor": tensor.name, "gguf_type": tensor.gguf_type}
    if packed is None:
        info["op"] = "Gather (float)" if kind == "embedding" else "MatMul (float)"
    else:
        info.update(
            op="GatherBlockQuantized" if kind == "embedding" else "MatMulNBits",
            bits=packed.blocks.bits,
            block_size=packed.blocks.block,
            weight_initializers=[p.b for p in packed.planes],
            planes=len(packed.planes),
            shares_weights_with=None,
            bytes=packed.bytes,  # B + scales (+ zero points/offsets) as stored
        )
        other = result.lm_head if kind == "embedding" else result.embedding
        if shared and other.get("weight_initializers") == [p.b for p in packed.planes]:
            # Stored once: the second user adds no bytes.
            info["shares_weights_with"] = "lm_head" if kind == "embedding" else "embedding"
            other["shares_weights_with"] = kind
            info["bytes"] = 0
    setattr(result, kind, info)


def _concat_rows(pieces: list[_Blocks]) -> _Blocks:
    """Blocks of several tensors of one GGUF type stacked along rows (they share bits, block and form)."""
    first = pieces[0]
    stack = lambda name: None if getattr(first, name) is None else np.concatenate([getattr(p, name) for p in pieces])  # noqa: E731
    return _Blocks(first.source, first.bits, first.block, stack("codes"), stack("scale"), stack("offset"), stack("zero"))


def _compatible(pieces: list[_Blocks]) -> bool:
    first = pieces[0]
    return all((b.bits, b.block, b.offset is None, b.zero is None) == (first.bits, first.block, first.offset is None, first.zero is None)
               for b in pieces)


def _split_matmul(g: _Graph, node, packed_parts: list[_Packed], accuracy_level: int | None) -> list:
    """MatMul(A, [W1 | W2 | ...]) -> Concat(MatMulNBits(A, W1), MatMulNBits(A, W2), ..., axis=-1)."""
    from onnx import helper

    base = node.name or node.output[0]
    nodes, outputs = [], []
    for i, packed in enumerate(packed_parts):
        out = g.unique(f"{base}_part{i}")
        part = helper.make_node("MatMul", [node.input[0], node.input[1]], [out], name=g.unique(f"{base}_part{i}"))
        nodes += _matmul_nbits(g, part, packed, accuracy_level)
        outputs.append(out)
    nodes.append(helper.make_node("Concat", outputs, [node.output[0]], name=g.unique(base + "_Concat"), axis=-1))
    return nodes


def _is_identity(perm: np.ndarray) -> bool:
    return bool(np.array_equal(perm, np.arange(len(perm))))


def _safe(name: str) -> str:
    return "gguf." + name


def _model_bytes(path: Path) -> int:
    """model.onnx plus external data files it references (same folder)."""
    import onnx

    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    locations = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    for location in locations:
        data = path.parent / location
        if data.is_file():
            total += data.stat().st_size
    return total


def _save(model, out: Path) -> None:
    """Graph in `out`, weights beside it in `out`.data (mapped at load, like every quantized export)."""
    from edgepack.core.onnx_io import save_model

    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out, external_data=True)
