"""Exact, fast CPU layouts for MatMulNBits weights (shared by the GGUF import and the weight-only schemes).

onnxruntime 1.32's CPU MatMulNBits is fast only for 4-bit weights with integer or default zero points.
Float zero points (what onnxruntime's HQQ quantizer emits) run ~25x slower, 8-bit weights at
accuracy_level 0 ~20x slower: both slower than the fp32 MatMul they replace. Every
weight is therefore re-expressed, value for value, as 4-bit pieces:

  * w = s*(u - zp), float zp       -> 4-bit codes with zero point 0 and a block minimum m = -s*zp, added
                                      as blocksum(A) @ m (block sums of the activations, A @ a 0/1 block indicator, and
                                      a small float MatMul with the [k_blocks, N] minimums);
  * w = s*(u - 128), 8-bit codes   -> two 4-bit planes, lo (scale s, zero point 0) and hi (scale 16*s,
                                      default zero point 8): s*lo + 16*s*(hi - 8) = s*(u - 128);
  * a tied embedding               -> GatherBlockQuantized on the lm_head's MatMulNBits B tensor
                                      [V, k_blocks, blob] itself (quantize_axis 2): stored once.

At accuracy_level 4 (int8 activations inside the kernel: approximate by design) 4-bit float zero points
take a faster, approximate form instead (`offset_columns`): integer zero points, and the rounding residue
as extra K columns of the same MatMulNBits, fed by the block sums appended to the activation. One kernel
per weight instead of MatMulNBits + MatMul + Add.

`Blocks` is the neutral form (codes, scale, zero point or block minimum) and `pack_blocks`,
`matmul_nbits_nodes`, `gather_block_quantized_nodes` write it; `edgepack.quantize.gguf_import` fills
`Blocks` from GGML blocks, `rewrite_for_cpu` below from MatMulNBits nodes onnxruntime's
MatMulNBitsQuantizer wrote.

Exactness. The identities above are exact in real arithmetic; in fp32 they are exact when the products
and sums need no rounding. GGUF scales are fp16 (11 significant bits), so they always are. onnxruntime's
quantizers write fp32 scales (24 bits) and HQQ free float zero points, so `snap_for_exact_layout` first
rounds, where a re-expression needs it, each scale to 11 significant bits (fp16-exact in fp16's range,
then stored as fp16 + Cast) and each float zero point to a grid of 2**-g (g chosen per tensor so that
every |u - zp| * 2**g < 2**13). Then s*u, s*(u - zp), s*zp and the plane terms are all exact in fp32,
and the rewrite is checked bit for bit: the dequantized weights of the new layout equal the
dequantization of the (snapped) MatMulNBits node. The snap moves a weight by at most 2**-12 of its
block scale times |u - zp| plus 2**-(g+1) of a step (reported as `snap_max_rel_change`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

MS_DOMAIN = "com.microsoft"


@dataclass
class Blocks:
    """A [rows, cols] weight as w = scale * (code - zero) + offset, blockwise along cols.

    zero is the MatMulNBits default 2**(bits-1) unless `zero` (uint8 per block) is set; `offset` is None
    for symmetric formats. For 4-bit formats with an offset the codes are used with zero = 0.
    """

    source: str  # where the blocks come from (a GGUF type, an onnxruntime quantizer, ...)
    bits: int
    block: int
    codes: np.ndarray  # uint8 [rows, cols], one code per weight
    scale: np.ndarray  # float32 [rows, n_blocks]
    offset: np.ndarray | None = None  # float32 [rows, n_blocks]
    zero: np.ndarray | None = None  # uint8 [rows, n_blocks] (requantized tensors only)

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> np.ndarray:
        """fp32 weights, computed in the same order as gguf.quants so the result is bit-identical."""
        rows, nb = self.scale.shape
        codes = self.codes.reshape(rows, nb, self.block).astype(np.float32)
        if self.offset is not None and self.bits == 4:
            w = self.scale[..., None] * codes + self.offset[..., None]
        else:
            zero = self.zero[..., None].astype(np.float32) if self.zero is not None else np.float32(2 ** (self.bits - 1))
            w = self.scale[..., None] * (codes - zero)
            if self.offset is not None:
                w = w + self.offset[..., None]
        return w.reshape(rows, self.cols)

    def take_rows(self, perm: np.ndarray) -> Blocks:
        pick = lambda a: None if a is None else a[perm]  # noqa: E731
        return Blocks(self.source, self.bits, self.block, self.codes[perm], self.scale[perm], pick(self.offset), pick(self.zero))




class GraphEdit:
    """Edits of one graph, collected and applied by `finish`. Tensors are read and written through `store`
    (an `external.TensorStore`): a model loaded without its weights is edited one tensor at a time."""

    def __init__(self, model, const_prefix: str = "cpu_layout", store=None):
        from onnx import numpy_helper

        from edgepack.quantize.external import TensorStore

        self.model = model
        self.const_prefix = const_prefix
        self.graph = model.graph
        self.np = numpy_helper
        self.store = store if store is not None else TensorStore()
        self.read = self.store.array
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.prefix_nodes: list = []  # nodes on initializers only (Cast, Div...), placed first
        self.replacements: dict[int, list] = {}  # id(original node) -> nodes replacing it
        self.new_inits: list = []
        self.scalars: dict[tuple, str] = {}
        self.block_sums: dict[tuple, str] = {}  # (activation, K, block) -> its block sums, computed once
        self.names: set[str] = set(self.inits) | {o for n in self.graph.node for o in n.output}
        self.names |= {i.name for i in self.graph.input}

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def add_init(self, array: np.ndarray, base: str) -> str:
        name = self.unique(base)
        self.new_inits.append(self.store.add(np.ascontiguousarray(array), name))
        return name

    def float_init(self, values: np.ndarray, base: str) -> tuple[str, int]:
        """Store fp32 values as fp16 + Cast when that is exact (GGUF scales are fp16); return (fp32 name, bytes)."""
        from onnx import TensorProto, helper

        half = values.astype(np.float16)
        if np.isfinite(half).all() and np.array_equal(half.astype(np.float32), values):
            stored = self.add_init(half, base + "_f16")
            name = self.unique(base)
            self.prefix_nodes.append(helper.make_node("Cast", [stored], [name], name=self.unique(f"Cast_{base}"), to=TensorProto.FLOAT))
            return name, half.nbytes
        return self.add_init(values.astype(np.float32), base), values.nbytes

    def scalar_f32(self, value: float) -> str:
        """One shared fp32 scalar initializer per value."""
        key = ("f32", float(value))
        if key not in self.scalars:
            self.scalars[key] = self.add_init(np.array(value, np.float32), f"{self.const_prefix}.const_{value:g}")
        return self.scalars[key]

    def const_i64(self, values, base: str) -> str:
        return self.add_init(np.array(values, dtype=np.int64), base)

    def block_sum(self, a: str, k: int, block: int, nodes: list) -> str:
        """Sums of each `block` consecutive features of activation `a` (last axis, length k): A @ S.

        S is the constant 0/1 [k, k/block] block indicator. One MatMul of any input rank, shared by every
        weight that reads `a` (gate and up; the down projection's input once). It replaced
        Shape/Concat/Reshape/ReduceSum per weight: on the builder's SmolLM2 graph those small nodes
        cost about as much as the int4 MatMulNBits themselves. The first user appends the node to `nodes`.
        """
        from onnx import helper

        key = (a, k, block)
        if key not in self.block_sums:
            indicator_key = ("blocks", k, block)
            if indicator_key not in self.scalars:
                indicator = np.kron(np.eye(k // block, dtype=np.float32), np.ones((block, 1), np.float32))
                self.scalars[indicator_key] = self.add_init(indicator, f"{self.const_prefix}.block_indicator_{k}x{block}")
            out = self.unique(f"{a}_block_sums{block}")
            nodes.append(helper.make_node("MatMul", [a, self.scalars[indicator_key]], [out], name=self.unique(f"BlockSum_{out}")))
            self.block_sums[key] = out
        return self.block_sums[key]

    def finish(self, removed_inits: set[str]) -> None:
        from onnx import helper

        nodes = list(self.prefix_nodes)
        for node in self.graph.node:
            nodes.extend(self.replacements.get(id(node), [node]))
        # Drop nodes whose outputs nobody reads any more (the lm_head's Transpose of the embedding).
        while True:
            used = {i for n in nodes for i in n.input} | {o.name for o in self.graph.output}
            dead = [n for n in nodes if n.op_type == "Transpose" and not any(o in used for o in n.output)]
            if not dead:
                break
            nodes = [n for n in nodes if n not in dead]
        used = {i for n in nodes for i in n.input} | {o.name for o in self.graph.output}
        keep = [i for i in self.graph.initializer if not (i.name in removed_inits and i.name not in used)]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep + self.new_inits)
        # Graph inputs that only named an initializer (old IR style) must go with it.
        stale = [i for i in self.graph.input if i.name in removed_inits and i.name not in used]
        for item in stale:
            self.graph.input.remove(item)
        if not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


@dataclass
class Plane:
    """One MatMulNBits weight: 4-bit (or 8-bit) codes with their scales; zero point default, 0, or given."""

    b: str  # uint8 [N, k_blocks, blob]
    scales: str  # fp32 [N, k_blocks] (maybe via Cast / Mul, folded by onnxruntime)
    bits: int
    zero: str | None  # None: MatMulNBits default 2**(bits-1)
    gather_zero: str | None  # the same zero points shaped [N, k_blocks, 1] for GatherBlockQuantized


@dataclass
class Packed:
    """Initializers written once per GGUF tensor (and row order), shared by every node that uses them."""

    blocks: Blocks
    planes: list[Plane]
    neg_offset: str | None  # fp32 [N, k_blocks]: -offset, for the embedding path
    offset_t: str | None  # fp32 [k_blocks, N]: offsets, for the blocksum correction of MatMul
    bytes: int


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, k_blocks, block] codes -> MatMulNBits B [N, k_blocks, block*bits/8].

    4 bits: element 2i in the low nibble, 2i+1 in the high nibble of byte i (checked against
    onnxruntime's quantize_matmul_4bits; GGML instead stores element j and j+16 in one byte).
    """
    if bits == 4:
        return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return codes.astype(np.uint8)


def _zero_points(g: GraphEdit, rows: int, nb: int, base: str) -> tuple[str, str]:
    """All-zero uint8 zero points, made by ConstantOfShape (folded at session creation, nothing stored)."""
    from onnx import TensorProto, helper

    names = []
    for shape, tag in (([rows, (nb + 1) // 2], "zero_points"), ([rows, nb, 1], "zero_points3")):
        name = g.unique(f"{base}_{tag}")
        g.prefix_nodes.append(
            helper.make_node(
                "ConstantOfShape", [g.const_i64(shape, f"{base}_{tag}_shape")], [name], name=g.unique(f"ConstantOfShape_{base}_{tag}"),
                value=helper.make_tensor("zero", TensorProto.UINT8, [1], [0]),
            )
        )  # fmt: skip
        names.append(name)
    return names[0], names[1]


def pack_blocks(g: GraphEdit, blocks: Blocks, base: str, *, single_8bit: bool) -> Packed:
    """Write B / scales / zero points for MatMulNBits from decomposed blocks.

    onnxruntime's CPU MatMulNBits is fast only for 4-bit weights with integer (or default) zero points:
    float zero points and 8-bit weights at accuracy_level 0 take a slow dequantizing path, 10-25x slower
    than the 4-bit kernel and slower than fp32 MatMul (measured, onnxruntime 1.32). So every format is
    written as 4-bit planes, exactly:
      * w = s*(u - 8) (4-bit symmetric): one plane, default zero point;
      * w = s*u + m (4-bit with a minimum): one plane with zero point 0, m added by the caller;
      * w = s*(u - 128) (8-bit codes u = lo + 16*hi): planes lo (scale s, zero point 0) and hi
        (scale 16*s, default zero point 8): s*lo + 16*s*(hi - 8) = s*(u - 128), each term exact in fp32.
    With `single_8bit` (accuracy_level 4: int8 activations, where the 8-bit kernel is fast) 8-bit
    codes stay one plane.
    """
    from onnx import helper

    rows, cols = blocks.codes.shape
    nb = cols // blocks.block
    codes = blocks.codes.reshape(rows, nb, blocks.block)
    scales, nbytes = g.float_init(blocks.scale, base + "_scales")
    planes: list[Plane] = []
    zero = gather_zero = None
    if blocks.zero is not None:  # integer zero points (requantized tensors)
        z = blocks.zero
        if blocks.bits == 4:
            z = np.pad(z, ((0, 0), (0, nb % 2)))
            z = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
        zero = g.add_init(z.astype(np.uint8), base + "_zero_points")
        gather_zero = g.add_init(blocks.zero.reshape(rows, nb, 1).astype(np.uint8), base + "_zero_points3")
        nbytes += z.nbytes + blocks.zero.nbytes
    elif blocks.offset is not None and blocks.bits == 4:
        zero, gather_zero = _zero_points(g, rows, nb, base)
        if single_8bit:
            # accuracy_level 4 quantizes the activations to int8 inside MatMulNBits; with codes 0..15 against
            # zero point 0 that error no longer cancels against the exact fp32 minimum term (SmolLM2 logits
            # off by 3). Centre the codes instead: s*u + m = s*(u - 8) + (m + 8*s), one fp32 rounding of m + 8*s.
            zero = None
    if blocks.bits == 4 or single_8bit:
        packed = pack_codes(codes, blocks.bits)
        planes.append(Plane(g.add_init(packed, base + "_B"), scales, blocks.bits, zero, gather_zero))
        nbytes += packed.nbytes
    else:
        assert blocks.zero is None
        lo, hi = pack_codes(codes & 0x0F, 4), pack_codes(codes >> 4, 4)
        zero, gather_zero = _zero_points(g, rows, nb, base)
        scales16 = g.unique(base + "_scales_x16")
        g.prefix_nodes.append(
            helper.make_node("Mul", [scales, g.scalar_f32(16.0)], [scales16], name=g.unique(f"Mul_{base}"))
        )
        planes.append(Plane(g.add_init(lo, base + "_Blo"), scales, 4, zero, gather_zero))
        planes.append(Plane(g.add_init(hi, base + "_Bhi"), scales16, 4, None, None))
        nbytes += lo.nbytes + hi.nbytes
    neg_offset = offset_t = None
    if blocks.offset is not None:
        neg_offset, n = g.float_init(-blocks.offset, base + "_neg_offset")
        offset_t, offset = g.unique(base + "_offset_t"), g.unique(base + "_offset")
        g.prefix_nodes.append(helper.make_node("Neg", [neg_offset], [offset], name=g.unique(f"Neg_{base}")))
        if blocks.bits == 4 and blocks.zero is None and planes[0].zero is None:  # centred codes (see above)
            centred, eight_s = g.unique(base + "_offset_centred"), g.unique(base + "_scales_x8")
            g.prefix_nodes.append(helper.make_node("Mul", [scales, g.scalar_f32(8.0)], [eight_s], name=g.unique(f"Mul_{base}")))
            g.prefix_nodes.append(helper.make_node("Add", [offset, eight_s], [centred], name=g.unique(f"Add_{base}")))
            offset = centred
        g.prefix_nodes.append(helper.make_node("Transpose", [offset], [offset_t], name=g.unique(f"Transpose_{base}"), perm=[1, 0]))
        nbytes += n
    return Packed(blocks, planes, neg_offset, offset_t, nbytes)


def matmul_nbits_nodes(g: GraphEdit, node, packed: Packed, accuracy_level: int | None) -> list:
    """MatMul(A, W) -> sum of MatMulNBits planes, plus blocksum(A) @ offsets for formats with a minimum.

    The offset term is exact algebra: sum_k A[k] * (s*q + m)[k, n] = sum_k A[k]*s*q + sum_blocks m[b, n] *
    sum_{k in b} A[k]. MatMulNBits has no fast form for a float per-block minimum (see `_pack`).
    """
    from onnx import helper

    blocks = packed.blocks
    a, y = node.input[0], node.output[0]
    base = node.name or y
    attrs = dict(K=blocks.cols, N=blocks.rows, block_size=blocks.block)
    if accuracy_level is not None:
        attrs["accuracy_level"] = int(accuracy_level)
    nodes, terms = [], []
    for i, plane in enumerate(packed.planes):
        inputs = [a, plane.b, plane.scales] + ([plane.zero] if plane.zero else [])
        out = g.unique(f"{base}_q{i}")
        nodes.append(helper.make_node("MatMulNBits", inputs, [out], name=g.unique(base + "_Q"), domain=MS_DOMAIN, bits=plane.bits, **attrs))
        terms.append(out)
    if packed.offset_t is not None:
        sums, corr = g.block_sum(a, blocks.cols, blocks.block, nodes), g.unique(f"{base}_offset")
        nodes.append(helper.make_node("MatMul", [sums, packed.offset_t], [corr], name=g.unique(base + "_OffsetMatMul")))
        terms.append(corr)
    _sum_into(g, nodes, terms, y, base)
    return nodes


def _sum_into(g: GraphEdit, nodes: list, terms: list[str], y: str, base: str) -> None:
    from onnx import helper

    if len(terms) == 1:  # rename the single producer's output to y
        nodes[-1].output[0] = y
        return
    acc = terms[0]
    for i, term in enumerate(terms[1:], 1):
        out = y if i == len(terms) - 1 else g.unique(f"{base}_sum{i}")
        nodes.append(helper.make_node("Add", [acc, term], [out], name=g.unique(base + "_Add")))
        acc = out


def gather_block_quantized_nodes(g: GraphEdit, node, packed: Packed) -> list:
    """Embedding lookup on the MatMulNBits B tensor itself: data [V, k_blocks, blob], quantize_axis 2."""
    from onnx import helper

    blocks = packed.blocks
    rows, cols = blocks.codes.shape
    nb = cols // blocks.block
    ids, y = node.input[1], node.output[0]
    base = node.name or y
    nodes, terms = [], []
    for i, plane in enumerate(packed.planes):
        scales3, gathered = g.unique(f"{base}_scales3_{i}"), g.unique(f"{base}_blocks{i}")
        nodes.append(
            helper.make_node("Reshape", [plane.scales, g.const_i64([rows, nb, 1], base + "_s3shape")], [scales3], name=g.unique(base + "_ReshapeScales"))
        )
        inputs = [plane.b, ids, scales3] + ([plane.gather_zero] if plane.gather_zero else [])
        nodes.append(
            helper.make_node(
                "GatherBlockQuantized", inputs, [gathered], name=g.unique(base + "_GBQ"), domain=MS_DOMAIN,
                bits=plane.bits, block_size=blocks.block, gather_axis=0, quantize_axis=2,
            )
        )  # fmt: skip
        terms.append(gathered)
    summed = g.unique(base + "_summed")
    _sum_into(g, nodes, terms, summed, base)
    if packed.neg_offset is not None:  # w = s*q - (-m): the same single rounding as gguf's d*q + m
        off, off3, shifted = (g.unique(f"{base}_{s}") for s in ("offset", "offset3", "shifted"))
        nodes += [
            helper.make_node("Gather", [packed.neg_offset, ids], [off], name=g.unique(base + "_GatherOffset"), axis=0),
            helper.make_node("Unsqueeze", [off, g.const_i64([-1], base + "_last")], [off3], name=g.unique(base + "_Unsqueeze")),
            helper.make_node("Sub", [summed, off3], [shifted], name=g.unique(base + "_Sub")),
        ]
        summed = shifted
    ids_shape, out_shape = g.unique(base + "_ids_shape"), g.unique(base + "_out_shape")
    nodes += [
        helper.make_node("Shape", [ids], [ids_shape], name=g.unique(base + "_Shape")),
        helper.make_node("Concat", [ids_shape, g.const_i64([cols], base + "_hidden")], [out_shape], name=g.unique(base + "_Concat"), axis=0),
        helper.make_node("Reshape", [summed, out_shape], [y], name=g.unique(base + "_Reshape")),
    ]
    return nodes


# ----------------------------------------------------------------------------------------------
# MatMulNBits nodes written by onnxruntime's MatMulNBitsQuantizer -> Blocks -> the fast layout
# ----------------------------------------------------------------------------------------------

_SCALE_BITS = 11  # significant bits kept by the snap: fp16's mantissa, so snapped scales store as fp16
# Residue planes of `offset_columns`: each further plane quantizes what the planes before it left, so
# it lowers KL against the exact layout but adds columns (size and decode time). One plane: speed first
# (level 4 is the fast, approximate setting; the exact layout is level 0).
OFFSET_PLANES = 1
# A GGUF's blocks are the weights the user chose: two planes carry their minimums to ~1/16 of one plane's
# error, so what is left against the GGUF is the int8 activations of accuracy_level 4, as in llama.cpp.
GGUF_OFFSET_PLANES = 2
_GRID_BITS = 13  # |u - zp| * 2**g < 2**13: with 11-bit scales every product fits fp32's 24 bits


@dataclass
class NBitsWeight:
    """One MatMulNBits weight as onnxruntime stores it: w[n, k] = scale * (code - zero), blockwise along K."""

    node: object
    bits: int
    block: int
    accuracy_level: int
    codes: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [N, k_blocks]
    zero: np.ndarray | None  # None (default 2**(bits-1)), uint8 or float32 [N, k_blocks]
    inputs: tuple[str, ...]  # B, scales(, zero_points) initializer names

    @property
    def float_zero(self) -> bool:
        return self.zero is not None and self.zero.dtype != np.uint8

    def dequantize(self) -> np.ndarray:
        """fp32 weights [N, K] in onnxruntime's order: (code - zero) * scale."""
        rows, nb = self.scale.shape
        codes = self.codes.reshape(rows, nb, self.block).astype(np.float32)
        zero = np.float32(2 ** (self.bits - 1)) if self.zero is None else self.zero.astype(np.float32)[..., None]
        return ((codes - zero) * self.scale[..., None]).reshape(rows, -1)


def read_matmul_nbits(g: GraphEdit, node) -> NBitsWeight | None:
    """Decode a MatMulNBits node whose B / scales / zero points are initializers; None if it cannot be."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, block, k, n = attrs.get("bits", 4), attrs.get("block_size"), attrs.get("K"), attrs.get("N")
    extra = [name for name in node.input[4:] if name]  # g_idx, bias
    names = [name for name in node.input[1:4] if name]
    if bits not in (4, 8) or not block or extra or k % block or any(name not in g.inits for name in names):
        return None
    nb = k // block
    b = g.read(g.inits[node.input[1]])
    if b.dtype != np.uint8 or b.size != n * nb * block * bits // 8:
        return None
    b = b.reshape(n, nb, -1)
    codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, k) if bits == 4 else b.reshape(n, k)
    scale = g.read(g.inits[node.input[2]]).astype(np.float32).reshape(n, nb)
    zero = None
    if len(node.input) > 3 and node.input[3]:
        z = g.read(g.inits[node.input[3]])
        if z.dtype == np.uint8:
            z = z.reshape(n, -1)
            zero = (np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1) if bits == 4 else z)[:, :nb]
        else:
            zero = z.astype(np.float32).reshape(n, nb)
    level = int(attrs.get("accuracy_level", 0))
    return NBitsWeight(node, bits, block, level, codes, scale, zero, tuple(names))


def snap_scale(scale: np.ndarray) -> np.ndarray:
    """Round each scale to 11 significant bits (fp16's precision, fp32's exponent range)."""
    mantissa, exponent = np.frexp(scale.astype(np.float64))
    return np.ldexp(np.round(mantissa * 2.0**_SCALE_BITS) / 2.0**_SCALE_BITS, exponent).astype(np.float32)


def snap_zero(zero: np.ndarray, bits: int) -> np.ndarray:
    """Round float zero points to the finest grid 2**-g (g <= 8) with every |u - zp| * 2**g < 2**13."""
    reach = float(np.max(np.maximum(np.abs(zero), np.abs(2**bits - 1 - zero)), initial=0.0)) + 1.0
    g = min(8, int(np.floor(np.log2((2**_GRID_BITS - 1) / reach))))
    return (np.round(zero.astype(np.float64) * 2.0**g) / 2.0**g).astype(np.float32)


def needs_snap(w: NBitsWeight) -> bool:
    """Float zero points and 8-bit codes split into planes need exactly representable products."""
    return w.float_zero or (w.bits == 8 and w.accuracy_level != 4)


def snap(w: NBitsWeight) -> NBitsWeight:
    if not needs_snap(w):
        return w
    zero = snap_zero(w.zero, w.bits) if w.float_zero else w.zero
    return NBitsWeight(w.node, w.bits, w.block, w.accuracy_level, w.codes, snap_scale(w.scale), zero, w.inputs)


def to_blocks(w: NBitsWeight) -> Blocks:
    """The same weights as `Blocks`: float (and non-default 8-bit) zero points become block minimums."""
    source = f"MatMulNBits{w.bits}"
    if w.float_zero or (w.bits == 8 and w.zero is not None and w.accuracy_level != 4):  # uint8 zero points, split
        mid = np.float32(0 if w.bits == 4 else 2 ** (w.bits - 1))  # 4-bit minimums pair with zero point 0
        offset = (w.scale * (mid - w.zero.astype(np.float32))).astype(np.float32)  # exact after `snap`
        return Blocks(source, w.bits, w.block, w.codes, w.scale, offset)
    return Blocks(source, w.bits, w.block, w.codes, w.scale, None, w.zero)


def effective_weight(blocks: Blocks, *, single_8bit: bool) -> np.ndarray:
    """The weight the layout of `pack_blocks` multiplies by, summed in float64 (no rounding of the sum).

    Each MatMulNBits plane dequantizes in fp32 ((code - zero) * scale); the planes and the block-minimum
    term are then added as exact reals, which is what A @ W means up to summation order.
    """
    rows, nb = blocks.scale.shape
    codes = blocks.codes.reshape(rows, nb, blocks.block).astype(np.float32)
    s = blocks.scale[..., None]
    f32 = np.float32
    if blocks.zero is not None:
        total = ((codes - blocks.zero[..., None].astype(f32)) * s).astype(np.float64)
    elif blocks.bits == 4 and blocks.offset is not None and single_8bit:  # centred codes (see pack_blocks)
        total = ((codes - f32(8)) * s).astype(np.float64) + (blocks.offset[..., None] + s * f32(8)).astype(np.float64)
    elif blocks.bits == 4 and blocks.offset is not None:
        total = (codes * s).astype(np.float64) + blocks.offset[..., None].astype(np.float64)
    elif blocks.bits == 4 or single_8bit:
        total = ((codes - f32(2 ** (blocks.bits - 1))) * s).astype(np.float64)
    else:
        lo, hi = codes % 16, np.floor(codes / 16)
        total = (lo * s).astype(np.float64) + ((hi - f32(8)) * (s * f32(16))).astype(np.float64)
    if blocks.offset is not None and not (blocks.bits == 4 and blocks.zero is None):
        total = total + blocks.offset[..., None].astype(np.float64)
    return total.reshape(rows, -1)


_CHECK_ROWS = 4096  # weight rows compared at a time: the float64 copies stay a few tens of MB at any size


def _weight_rows(w: NBitsWeight, rows: slice) -> NBitsWeight:
    zero = None if w.zero is None else w.zero[rows]
    return NBitsWeight(w.node, w.bits, w.block, w.accuracy_level, w.codes[rows], w.scale[rows], zero, w.inputs)


def _block_rows(blocks: Blocks, rows: slice) -> Blocks:
    pick = lambda a: None if a is None else a[rows]  # noqa: E731
    return Blocks(blocks.source, blocks.bits, blocks.block, blocks.codes[rows], blocks.scale[rows], pick(blocks.offset), pick(blocks.zero))


def check_exact(w: NBitsWeight, blocks: Blocks, *, single_8bit: bool) -> bool:
    """Bit for bit: every weight of the new layout equals the MatMulNBits node's own dequantization
    (compared a slice of rows at a time: every value depends on its own row only)."""
    for start in range(0, w.codes.shape[0], _CHECK_ROWS):
        rows = slice(start, start + _CHECK_ROWS)
        mine = effective_weight(_block_rows(blocks, rows), single_8bit=single_8bit)
        if not np.array_equal(mine, _weight_rows(w, rows).dequantize().astype(np.float64)):
            return False
    return True


def snap_for_exact_layout(model, store=None) -> dict:
    """Snap, in place, the MatMulNBits nodes `rewrite_for_cpu` will re-express, so that re-expression is exact.

    Returns {"nodes": count, "max_rel_change": max |w_snapped - w| / max |w| over snapped weights}.
    `rewrite_for_cpu` calls it; it is public so tests can keep the snapped, not rewritten model as reference.
    """
    g = GraphEdit(model, store=store)
    count, worst = 0, 0.0
    for node in g.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        w = read_matmul_nbits(g, node)
        if w is None or not needs_snap(w) or check_exact(w, to_blocks(w), single_8bit=w.accuracy_level == 4):
            continue  # nothing to re-express, or already exact (snapped before, or fp16 scales)
        snapped = snap(w)
        peak = change = 0.0
        for start in range(0, w.codes.shape[0], _CHECK_ROWS):  # row slices: the same maxima, bounded memory
            rows = slice(start, start + _CHECK_ROWS)
            before, after = _weight_rows(w, rows).dequantize(), _weight_rows(snapped, rows).dequantize()
            peak = max(peak, float(np.abs(before).max(initial=0.0)))
            change = max(change, float(np.abs(after - before).max(initial=0.0)))
        if peak:
            worst = max(worst, change / peak)
        scale_init = g.inits[w.inputs[1]]
        dtype = g.store.dtype(scale_init)
        if not np.array_equal(snapped.scale.astype(dtype).astype(np.float32), snapped.scale):
            continue  # fp16 scales with an odd exponent: nothing to gain, leave the node as is
        scale_init.CopyFrom(g.store.add(snapped.scale.astype(dtype).reshape(tuple(scale_init.dims)), scale_init.name))
        if w.float_zero:
            zero_init = g.inits[w.inputs[2]]
            zero = snapped.zero.astype(g.store.dtype(zero_init)).reshape(tuple(zero_init.dims))
            zero_init.CopyFrom(g.store.add(zero, zero_init.name))
        count += 1
    return {"nodes": count, "max_rel_change": worst}


def offset_columns(w: NBitsWeight, planes: int = OFFSET_PLANES, target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """accuracy_level 4, 4-bit float zero points: integer zero points plus the rounding residue as extra K columns.

    w = s*(u - zf) = s*(u - zi) + r with zi = round(zf) and r = s*(zi - zf) one value per block and row.
    The residue term is sum_b r[n, b] * blocksum(A)[b]: appended to A as extra features (the block sums,
    zero-padded to whole blocks) and to W as extra columns, quantized to 4 bits with integer zero points
    like every other block, it rides inside the same MatMulNBits. That replaces the exact fp32
    `blocksum(A) @ minimums` MatMul + Add per weight (two small nodes per weight, each with its dispatch cost),
    at an error of at most half a step of the residue's own 4-bit grid (|r| <= s/2, so that step is about
    max s / 30 of the row's blocks instead of the s/2 zero-point rounding of plain RTN). Only at
    accuracy_level 4, which already quantizes the activations to int8 and is approximate anyway.
    With `planes` > 1 each further copy of the block sums carries what the planes before it left.

    `target` ([N, K]) is the weight to reproduce when it is not `w.dequantize()` (GGUF blocks s*u + m, whose
    float zero point -m/s is only a rounded stand-in).

    Returns (codes [N, K + planes*pad], scales [N, nb + planes*pad/block], zero points uint8 (same shape),
    max |w_new - w| / max |w|) where pad = the block sums rounded up to whole blocks.
    """
    rows, nb = w.scale.shape
    block, top = w.block, 2**w.bits - 1
    scale = snap_scale(w.scale)  # fp16-exact: stored as fp16
    zf = w.zero.astype(np.float32)
    zi = np.clip(np.round(zf), 0, top)
    target = (w.dequantize() if target is None else target).reshape(rows, nb, block).astype(np.float64)
    main = (w.codes.reshape(rows, nb, block).astype(np.float32) - zi[..., None].astype(np.float32)) * scale[..., None]
    left = resid0 = (target - main.astype(np.float64)).mean(axis=-1)  # least squares per block: s*(zi - zf) + snap
    pad = -(-nb // block) * block
    real = (np.arange(pad) < nb).reshape(pad // block, block)[None]
    codes, scales, zeros = [w.codes], [scale], [zi]
    for _ in range(planes):  # each plane quantizes what the planes before it left
        extra = np.zeros((rows, pad), np.float64)
        extra[:, :nb] = left
        extra = extra.reshape(rows, pad // block, block)
        lo = np.minimum(np.where(real, extra, np.inf).min(axis=-1), 0.0)
        hi = np.maximum(np.where(real, extra, -np.inf).max(axis=-1), 0.0)
        step = snap_scale(np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32))
        zero = np.clip(np.round(-lo / step), 0, top)
        plane = np.where(real, np.clip(np.round(extra / step[..., None]) + zero[..., None], 0, top), zero[..., None])
        left = left - ((plane - zero[..., None]) * step[..., None]).reshape(rows, pad)[:, :nb]
        codes.append(plane.reshape(rows, pad))
        scales.append(step)
        zeros.append(zero)
    carried = resid0 - left  # what the planes carry, per block
    peak = float(np.abs(target).max(initial=0.0)) or 1.0
    error = float(np.abs(main.astype(np.float64) + carried[..., None] - target).max(initial=0.0)) / peak
    return (np.concatenate(codes, axis=1).astype(np.uint8), np.concatenate(scales, axis=1).astype(np.float32),
            np.concatenate(zeros, axis=1).astype(np.uint8), error)


def with_block_sums(g: GraphEdit, activation: str, k: int, block: int, copies: int) -> tuple[list, str]:
    """(new nodes, name of) Concat(A, blocksum(A) zero-padded x `copies`): the widened activation that residue
    columns multiply. One per activation and layout, shared by the weights reading it (gate and up)."""
    from onnx import helper

    nodes: list = []
    key = (activation, k, block, copies)
    if key not in g.block_sums:
        pad = -(-(k // block) // block) * block
        indicator_key = ("blocks_padded", k, block)
        if indicator_key not in g.scalars:
            indicator = np.zeros((k, pad), np.float32)
            indicator[np.arange(k), np.arange(k) // block] = 1.0
            g.scalars[indicator_key] = g.add_init(indicator, f"{g.const_prefix}.block_indicator_{k}x{block}_padded")
        sums, widened = g.unique(f"{activation}_block_sums{block}_padded"), g.unique(f"{activation}_with_block_sums")
        nodes.append(helper.make_node("MatMul", [activation, g.scalars[indicator_key]], [sums], name=g.unique(f"BlockSum_{sums}")))
        nodes.append(helper.make_node("Concat", [activation] + [sums] * copies, [widened], name=g.unique(f"Concat_{widened}"), axis=-1))
        g.block_sums[key] = widened
    return nodes, g.block_sums[key]


def offset_column_nodes(g: GraphEdit, node, w: NBitsWeight, target: np.ndarray | None = None,
                        planes: int = OFFSET_PLANES) -> tuple[list, float]:
    """MatMul(A, W) -> MatMulNBits(Concat(A, blocksum(A) zero-padded), W with residue columns); see `offset_columns`."""
    from onnx import helper

    codes, scales, zeros, error = offset_columns(w, planes, target=target)
    rows, k = w.codes.shape
    block, nb = w.block, k // w.block
    pad = -(-nb // block) * block
    copies = (codes.shape[1] - k) // pad
    a, y = node.input[0], node.output[0]
    base = w.inputs[0]
    nodes, widened = with_block_sums(g, a, k, block, copies)
    nbt = scales.shape[1]
    packed = pack_codes(codes.reshape(rows, nbt, block), 4)
    z = np.pad(zeros, ((0, 0), (0, nbt % 2)))
    z = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    scale_name, _ = g.float_init(scales, base + "_scales")
    inputs = [widened, g.add_init(packed, base + "_B"), scale_name, g.add_init(z, base + "_zero_points")]
    nodes.append(
        helper.make_node(
            "MatMulNBits", inputs, [y], name=g.unique((node.name or y) + "_Q"), domain=MS_DOMAIN,
            bits=4, K=codes.shape[1], N=rows, block_size=block, accuracy_level=4,
        )
    )  # fmt: skip
    return nodes, error


def offset_column_nodes_for_blocks(g: GraphEdit, node, blocks: Blocks, base: str) -> tuple[list, float]:
    """`offset_column_nodes` for 4-bit blocks with a minimum (GGUF Q4_1, Q4_K, Q2_K: w = s*u + m) at
    accuracy_level 4: the float zero point -m/s becomes an integer one plus residue columns, so the weight
    needs one MatMulNBits instead of MatMulNBits + block sums @ minimums + Add. A block whose scale is 0
    (all its weights equal m) gets zero point 0 and its whole value as residue."""
    scale = blocks.scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(scale != 0, -blocks.offset / np.where(scale != 0, scale, 1), 0).astype(np.float32)
    w = NBitsWeight(node, 4, blocks.block, 4, blocks.codes, scale, zero, (base,))
    return offset_column_nodes(g, node, w, target=blocks.dequantize(), planes=GGUF_OFFSET_PLANES)


def find_tied_embeddings(model, lm_head: str | None, store=None) -> dict[str, str]:
    """Embedding Gathers whose table is bit-identical to the lm_head weight transposed: {gather name: lm_head output}.

    Run before quantization (the fp32 lm_head weight is gone afterwards). The table may be an initializer
    (optimum's export; edgepack's `untie_lm_head` then gave the lm_head its own transposed copy) or
    Transpose(lm_head weight) (onnxruntime-genai's builder).
    """
    from onnx import helper

    from edgepack.quantize.external import TensorStore

    store = store if store is not None else TensorStore()
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    head = nodes.get(lm_head) if lm_head else None
    if head is None or head.op_type != "MatMul" or head.input[1] not in inits or len(inits[head.input[1]].dims) != 2:
        return {}
    weight = inits[head.input[1]]
    ties: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0) != 0:
            continue
        data = node.input[0]
        if data in inits:  # a table [V, H]: equal to the weight [H, V] transposed?
            table, transposed = inits[data], True
        elif data in producer and producer[data].op_type == "Transpose" and producer[data].input[0] in inits:
            perm = next((list(a.ints) for a in producer[data].attribute if a.name == "perm"), [1, 0])
            table, transposed = inits[producer[data].input[0]], False  # Transpose(source): source equal to the weight?
            if perm != [1, 0] or len(table.dims) != 2:
                continue
        else:
            continue
        shape = list(weight.dims)[::-1] if transposed else list(weight.dims)
        if list(table.dims) != shape or table.data_type != weight.data_type:
            continue
        if table.name == weight.name or _bit_identical(store, table, weight, transposed):
            ties[node.name] = head.output[0]
    return ties


_COMPARE_ROWS = 4096  # rows of a table compared at a time: memory stays a few MB whatever the vocabulary


def _bit_identical(store, table, weight, transposed: bool) -> bool:
    """table == weight (or weight^T) bit for bit, read in row blocks of the table."""
    from edgepack.quantize.external import is_external

    if not (is_external(table) or is_external(weight)):  # both in memory already: one comparison
        a, b = store.array(table), store.array(weight)
        b = b.T if transposed else b
        return bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)))
    rows = int(table.dims[0])
    for start in range(0, rows, _COMPARE_ROWS):
        stop = min(rows, start + _COMPARE_ROWS)
        part = store.rows(table, start, stop)
        other = store.columns(weight, start, stop).T if transposed else store.rows(weight, start, stop)
        if not np.array_equal(np.ascontiguousarray(part).view(np.uint8), np.ascontiguousarray(other).view(np.uint8)):
            return False
    return True


def rewrite_for_cpu(model, *, tied_embeddings: dict[str, str] | None = None, int8_embeddings: tuple[str, ...] = (),
                    embedding_block_size: int = 32, store=None) -> dict:
    """Rewrite, in place, a model after onnxruntime's MatMulNBitsQuantizer into the fast exact CPU layout.

    * MatMulNBits with float zero points -> 4-bit codes, zero point 0 + blocksum(A) @ minimums;
    * 8-bit MatMulNBits at accuracy_level 0 -> two 4-bit planes (at level 4, 8-bit stays one plane);
    * `tied_embeddings` ({Gather name: lm_head output}, from `find_tied_embeddings` before quantization):
      the Gather becomes GatherBlockQuantized on the lm_head's own B tensor; the float table goes;
    * `int8_embeddings` (Gather names): 8-bit blocks (onnxruntime's RTN, symmetric) in GatherBlockQuantized.
    Every rewritten weight is checked bit for bit against the MatMulNBits node it replaces; a node that
    fails the check is left as it was and listed under `not_exact`. Tensors are read and written through
    `store` (`external.TensorStore`; default: the model's own inline tensors).
    """
    tied_embeddings = dict(tied_embeddings or {})
    snapped = snap_for_exact_layout(model, store=store)
    g = GraphEdit(model, store=store)
    removed: set[str] = set()
    facts = {
        "float_zero_points": 0, "split_8bit": 0, "kept_8bit": 0, "repacked_for_embedding": 0, "unchanged": 0,
        "not_exact": [], "skipped": [], "snapped_nodes": snapped["nodes"], "snap_max_rel_change": snapped["max_rel_change"],
        "fp16_scale_tensors": 0, "embeddings_shared": [], "embeddings_int8": [],
        "offset_columns": 0, "offset_columns_max_rel_error": 0.0,
    }
    packed_by_output = _rewrite_matmuls(g, set(tied_embeddings.values()), facts, removed)
    _rewrite_embeddings(g, tied_embeddings, int8_embeddings, embedding_block_size, packed_by_output, facts, removed)
    g.finish(removed)
    return facts


def _rewrite_matmuls(g: GraphEdit, heads: set[str], facts: dict, removed: set[str]) -> dict[str, Packed]:
    """Every MatMulNBits that needs it, into the exact CPU layout (counted in `facts`); returns the packed
    weights of the rewritten nodes by output name (the lm_heads' are what the tied embeddings share)."""
    packed_by_output: dict[str, Packed] = {}
    for node in list(g.graph.node):
        if node.op_type != "MatMulNBits":
            continue
        w = read_matmul_nbits(g, node)
        if w is None:
            facts["skipped"].append(node.name)
            continue
        single_8bit = w.accuracy_level == 4
        if not (w.float_zero or (w.bits == 8 and not single_8bit) or node.output[0] in heads):
            facts["unchanged"] += 1
            continue
        if w.float_zero and w.bits == 4 and single_8bit and node.output[0] not in heads:
            before = len(g.new_inits)
            g.replacements[id(node)], error = offset_column_nodes(g, node, w)
            facts["fp16_scale_tensors"] += sum(1 for i in g.new_inits[before:] if i.data_type == 10)  # FLOAT16
            removed.update(w.inputs)
            facts["offset_columns"] += 1
            facts["offset_columns_max_rel_error"] = max(facts["offset_columns_max_rel_error"], error)
            continue
        blocks = to_blocks(w)
        if not check_exact(w, blocks, single_8bit=single_8bit):
            facts["not_exact"].append(node.name)
            continue
        before = len(g.new_inits)
        packed = pack_blocks(g, blocks, w.inputs[0], single_8bit=single_8bit)
        facts["fp16_scale_tensors"] += sum(1 for i in g.new_inits[before:] if i.data_type == 10)  # FLOAT16
        g.replacements[id(node)] = matmul_nbits_nodes(g, node, packed, w.accuracy_level)
        removed.update(w.inputs)
        packed_by_output[node.output[0]] = packed
        if w.float_zero:
            facts["float_zero_points"] += 1
        elif w.bits == 8:
            facts["split_8bit" if len(packed.planes) == 2 else "kept_8bit"] += 1
        else:
            facts["repacked_for_embedding"] += 1
    return packed_by_output


def _rewrite_embeddings(g: GraphEdit, tied_embeddings: dict[str, str], int8_embeddings: tuple[str, ...], embedding_block_size: int,
                        packed_by_output: dict[str, Packed], facts: dict, removed: set[str]) -> None:
    """Embedding Gathers -> GatherBlockQuantized: on the tied lm_head's packed weight, or on 8-bit RTN blocks."""
    from onnx import helper

    for node in g.graph.node:
        if node.op_type != "Gather":
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if node.name in tied_embeddings and axis == 0 and tied_embeddings[node.name] in packed_by_output:
            g.replacements[id(node)] = gather_block_quantized_nodes(g, node, packed_by_output[tied_embeddings[node.name]])
            removed.add(node.input[0])
            if node.input[0] in g.producer:  # Transpose(lm_head weight): the Transpose dies, then its input
                removed.add(g.producer[node.input[0]].input[0])
            facts["embeddings_shared"].append(node.name)
        elif node.name in int8_embeddings and axis == 0 and node.input[0] in g.inits:
            table = g.inits[node.input[0]]
            if len(table.dims) != 2 or table.dims[1] % embedding_block_size:
                continue
            blocks = rtn_blocks_by_rows(g.store, table, 8, embedding_block_size)
            packed = pack_blocks(g, blocks, node.input[0] + "_Q8", single_8bit=True)
            g.replacements[id(node)] = gather_block_quantized_nodes(g, node, packed)
            removed.add(node.input[0])
            facts["embeddings_int8"].append(node.name)


_RTN_ROWS = 8192  # table rows quantized at a time (rows are independent: blocks run along a row)


def rtn_blocks_by_rows(store, table, bits: int, block: int) -> Blocks:
    """`rtn_blocks` of a [rows, cols] initializer, read and quantized a slice of rows at a time; the same
    blocks, holding the codes and one slice of floats instead of the float table and its copies."""
    rows = int(table.dims[0])
    parts = [rtn_blocks(store.rows(table, start, start + _RTN_ROWS).astype(np.float32), bits, block)
             for start in range(0, rows, _RTN_ROWS)]
    if len(parts) == 1:
        return parts[0]
    return Blocks(parts[0].source, bits, block, np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]))


def rtn_blocks(rows: np.ndarray, bits: int, block: int) -> Blocks:
    """onnxruntime's RTN block quantizer (symmetric) on a [rows, cols] matrix, blocks along cols."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits))
    packed, scales, _zero = quantizer.qbits_block_quant(np.ascontiguousarray(rows.T))  # it expects [K, N]
    n, k = rows.shape
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1) if bits == 4 else packed.reshape(n, -1)
    return Blocks(f"RTN{bits}", bits, block, codes[:, :k], scales.astype(np.float32).reshape(n, -1))
