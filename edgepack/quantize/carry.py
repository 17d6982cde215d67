"""Carry a quantized export's weights into another graph of the same model, instead of quantizing again.

`edgepack target ort` builds onnxruntime-genai's fused decoding graph from the Hugging Face weights, in
fp32. Its source is a quantized export whose weights `quantize` chose and measured. Quantizing the
builder's graph again with the same scheme would cost the scheme's time once more (HQQ is most of
`quantize`'s time) and ship weights that were never measured: HQQ's stopping rule looks at a whole
tensor, so the builder's fused q/k/v weight does not even quantize to the three blocks `quantize` made.

`carry_quantized_weights` therefore finds, for each float weight of the builder graph, the weight of the
fp32 export it equals (by content: a digest of each output row, read a slice of rows at a time from the
external data), reads how the quantized export stores that weight (the `cpu_layout` forms:
MatMulNBits planes, block minimums added through block sums, GatherBlockQuantized embeddings sharing
the lm_head's blocks) back into `cpu_layout.Blocks`, and writes those blocks into the builder graph
with the same writers (`pack_blocks`, `matmul_nbits_nodes`, `gather_block_quantized_nodes`; accuracy_level 4's
residue columns are written as `offset_column_nodes` writes them). The quantized bytes (codes, scales,
minimums) are the source's; a weight the builder stacks from several source weights (fused q/k/v) gets
their blocks stacked along the output rows, and one it splits off a source weight (Phi-3's fused
gate/up) gets its row range of them, both exact because every block lies within one output row.

What is not carried (no equal weight in the fp32 export, a layout this reader does not know) is quantized
with the scheme as before, and listed with the reason.

Why by hand: no library maps one ONNX graph's quantized initializers onto another graph of the same weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepack.quantize.cpu_layout import (
    MS_DOMAIN,
    Blocks,
    GraphEdit,
    gather_block_quantized_nodes,
    matmul_nbits_nodes,
    pack_blocks,
)

_CHUNK_BYTES = 32 << 20  # float rows read (and digested) at a time
_CARRIED = "EdgepackCarried"  # op_type prefix that hides carried nodes from the scheme applied to the rest


# ----------------------------------------------------------------------------------------------
# Float weights and their content
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A float weight of a graph, seen as [N, K] rows (PyTorch's Linear layout, an embedding table's rows)."""

    kind: str  # "matmul" (MatMul B, possibly Transpose(table)) or "embedding" (Gather table, possibly Transpose(B))
    node: str  # the MatMul / Gather node's name
    output: str  # its output
    activation: str  # a MatMul's input A, a Gather's indices
    init: str  # the float initializer
    transposed: bool  # the initializer is [K, N]: its columns are the rows


def weight_sites(model) -> list[Site]:
    """Every float MatMul weight and embedding table of `model` (loaded with or without its data)."""
    from onnx import TensorProto, helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def float_2d(name):
        init = inits.get(name)
        return init is not None and init.data_type == TensorProto.FLOAT and len(init.dims) == 2

    def transposed_init(name):  # Transpose(initializer) with perm [1, 0] -> the initializer
        node = producer.get(name)
        if node is None or node.op_type != "Transpose" or not float_2d(node.input[0]):
            return None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        return node.input[0] if perm == [1, 0] else None

    sites = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            weight = node.input[1]
            if float_2d(weight):
                sites.append(Site("matmul", node.name, node.output[0], node.input[0], weight, True))
            elif transposed_init(weight):  # optimum's tied lm_head: MatMul(x, Transpose(table))
                sites.append(Site("matmul", node.name, node.output[0], node.input[0], transposed_init(weight), False))
        elif node.op_type == "Gather":
            if next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0) != 0:
                continue
            table = node.input[0]
            if float_2d(table):
                sites.append(Site("embedding", node.name, node.output[0], node.input[1], table, False))
            elif transposed_init(table):  # the builder's tied embedding: Gather(Transpose(lm_head weight))
                sites.append(Site("embedding", node.name, node.output[0], node.input[1], transposed_init(table), True))
    return sites


class RowDigests:
    """Digests of each row of float weights ([N, K] view), one slice of rows in memory at a time; cached
    per (initializer, orientation) so a tied table is read once."""

    def __init__(self, model, store):
        self.inits = {i.name: i for i in model.graph.initializer}
        self.store = store
        self.cache: dict[tuple[str, bool], list[bytes]] = {}

    def rows(self, init: str, transposed: bool) -> list[bytes]:
        key = (init, transposed)
        if key not in self.cache:
            tensor = self.inits[init]
            dims = [int(d) for d in tensor.dims]
            rows, cols = (dims[1], dims[0]) if transposed else (dims[0], dims[1])
            step = max(1, _CHUNK_BYTES // (4 * max(cols, 1)))
            digests: list[bytes] = []
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                part = self.store.columns(tensor, start, stop).T if transposed else self.store.rows(tensor, start, stop)
                part = np.ascontiguousarray(part, dtype=np.float32)
                digests.extend(hashlib.blake2b(row, digest_size=16).digest() for row in part.view(np.uint8).reshape(stop - start, -1))
                del part
            self.cache[key] = digests
        return self.cache[key]


def signature(digests: list[bytes]) -> bytes:
    return hashlib.blake2b(b"".join(digests), digest_size=16).digest()


# ----------------------------------------------------------------------------------------------
# Reading a quantized export's layout back into Blocks
# ----------------------------------------------------------------------------------------------


@dataclass
class _Plane:
    bits: int
    block: int
    level: int | None
    b_name: str
    b: np.ndarray  # uint8 [N, k_blocks, blob]
    scale_name: str  # the fp32 scales as the graph names them (maybe a Cast's output)
    scale: np.ndarray  # fp32 [N, k_blocks]
    zero: object  # None (the format's default), "zeros" (ConstantOfShape 0), or uint8 [N, k_blocks]


@dataclass
class Layout:
    """One quantized weight of the source graph: its blocks, how `pack_blocks` is to lay them out, the node
    attribute, and the source initializers holding its codes (to see which layouts share them)."""

    blocks: Blocks
    single_8bit: bool
    accuracy_level: int | None
    b_names: tuple[str, ...]
    b_arrays: list[np.ndarray] = field(repr=False, default_factory=list)
    residue: tuple[int, int] | None = None  # accuracy_level 4's residue columns: (K of the activation, block-sum copies)


class LayoutReader:
    """Reads, from a quantized graph loaded without its data, the blocks each layout stores (None: unknown form)."""

    def __init__(self, model, store):
        from onnx import helper

        self.helper = helper
        self.store = store
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}

    def attrs(self, node) -> dict:
        return {a.name: self.helper.get_attribute_value(a) for a in node.attribute}

    def value(self, name: str) -> np.ndarray | None:
        """An initializer's values, through a Cast if there is one (fp16-stored scales and minimums)."""
        if name in self.inits:
            return self.store.array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Cast" and node.input[0] in self.inits:
            from onnx import helper

            return self.store.array(self.inits[node.input[0]]).astype(helper.tensor_dtype_to_np_dtype(self.attrs(node)["to"]))
        return None

    def zero(self, name: str, rows: int, nb: int, bits: int, packed: bool):
        if not name:
            return None
        node = self.producer.get(name)
        if node is not None and node.op_type == "ConstantOfShape":
            fill = self.attrs(node).get("value")
            return "zeros" if fill is None or not np.any(_tensor_values(fill)) else False
        z = self.value(name)
        if z is None or z.dtype != np.uint8:
            return False
        z = z.reshape(rows, -1)
        if packed and bits == 4:
            z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(rows, -1)
        return z[:, :nb] if z.shape[1] >= nb else False

    def terms(self, name: str, depth: int = 0) -> list[str]:
        """The summands of an Add chain ending in `name` (the layouts sum their planes and minimum term)."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Add" or depth > 4 or any(i in self.inits for i in node.input):
            return [name]
        return self.terms(node.input[0], depth + 1) + self.terms(node.input[1], depth + 1)

    def _plane(self, b_name: str, scale_name: str, zero_name: str, bits: int, block: int, rows: int, level, packed_zero: bool):
        if b_name not in self.inits:
            return None
        b = self.store.array(self.inits[b_name])
        scale = self.value(scale_name)
        times = self.producer.get(scale_name)
        if scale is None and times is not None and times.op_type == "Mul":  # the high plane's 16 * scales
            base, factor = self.value(times.input[0]), self.value(times.input[1])
            scale = base * factor.reshape(()) if base is not None and factor is not None and factor.size == 1 else None
        if b.dtype != np.uint8 or scale is None or block <= 0 or b.size % rows or scale.size % rows:
            return None
        nb = scale.size // rows
        if b.size != rows * nb * block * bits // 8:
            return None
        zero = self.zero(zero_name, rows, nb, bits, packed_zero)
        if zero is False:
            return None
        return _Plane(bits, block, level, b_name, b.reshape(rows, nb, -1), scale_name, scale.astype(np.float32).reshape(rows, nb), zero)

    def _offset(self, name: str):
        """(block minimums [N, k_blocks], centred) of `Transpose(Neg(stored))` or `Transpose(Neg(stored) + 8*scales)`."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Transpose" or self.attrs(node).get("perm", [1, 0]) != [1, 0]:
            return None
        inner = self.producer.get(node.input[0])
        centred = None
        if inner is not None and inner.op_type == "Add":  # centred codes: m + 8*s (see cpu_layout.pack_blocks)
            mul = self.producer.get(inner.input[1])
            if mul is None or mul.op_type != "Mul" or not _scalar_is(self.value(mul.input[1]), 8.0):
                return None
            centred = mul.input[0]
            inner = self.producer.get(inner.input[0])
        if inner is None or inner.op_type != "Neg":
            return None
        neg = self.value(inner.input[0])
        if neg is None or neg.ndim != 2:
            return None
        return (-neg).astype(np.float32), centred

    def matmul(self, output: str, activation: str) -> Layout | str:
        """The layout computing `output` from `activation`, or why it cannot be read."""
        planes, offset = [], None
        residue = self._residue(self.producer.get(output), activation)
        if residue is not None:
            return residue
        for term in self.terms(output):
            node = self.producer.get(term)
            if node is None:
                return "not computed by a known layout"
            if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN and node.input[0] == activation:
                a = self.attrs(node)
                if [i for i in node.input[4:] if i]:
                    return "MatMulNBits with g_idx or bias"
                plane = self._plane(node.input[1], node.input[2], node.input[3] if len(node.input) > 3 else "",
                                    int(a.get("bits", 4)), int(a.get("block_size", 0)), int(a.get("N", 0)) or 1,
                                    a.get("accuracy_level"), packed_zero=True)
                if plane is None or plane.b.shape[1] * plane.block != int(a.get("K", -1)):
                    return "MatMulNBits with inputs this reader does not know"
                planes.append(plane)
            elif node.op_type == "MatMul" and offset is None:
                sums = self.producer.get(node.input[0])
                if sums is None or sums.op_type != "MatMul" or sums.input[0] != activation or sums.input[1] not in self.inits:
                    return "float MatMul (not quantized)" if node.input[0] == activation else "MatMul not on the block sums"
                offset = self._offset(node.input[1])
                if offset is None:
                    return "block minimums in a form this reader does not know"
            elif node.op_type == "MatMul":
                return "float MatMul (not quantized)"
            else:
                return f"{node.op_type}: not a layout this reader knows"
        return self._combine(planes, offset, gather=False)

    def _residue(self, node, activation: str) -> Layout | str | None:
        """accuracy_level 4's one-kernel form (cpu_layout.offset_columns): MatMulNBits on Concat(A, block sums...)
        with integer zero points; None when `node` is not that form."""
        if node is None or node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
            return None
        widened = self.producer.get(node.input[0])
        if widened is None or widened.op_type != "Concat" or widened.input[0] != activation or len(widened.input) < 2:
            return None
        sums = self.producer.get(widened.input[1])
        if (len(set(widened.input[1:])) != 1 or sums is None or sums.op_type != "MatMul" or sums.input[0] != activation
                or sums.input[1] not in self.inits):
            return "block sums in a form this reader does not know"
        a = self.attrs(node)
        k, pad = (int(d) for d in self.inits[sums.input[1]].dims)
        copies, block, bits = len(widened.input) - 1, int(a.get("block_size", 0)), int(a.get("bits", 4))
        if [i for i in node.input[4:] if i] or bits != 4 or len(node.input) < 4:
            return "residue columns in a form this reader does not know"
        plane = self._plane(node.input[1], node.input[2], node.input[3], 4, block, int(a.get("N", 0)) or 1, a.get("accuracy_level"),
                            packed_zero=True)
        wide = int(a.get("K", -1))
        if plane is None or not isinstance(plane.zero, np.ndarray) or plane.b.shape[1] * block != wide or k + copies * pad != wide:
            return "residue columns in a form this reader does not know"
        blocks = Blocks("carried", 4, block, _unpack(plane.b, 4), plane.scale, None, plane.zero)
        return Layout(blocks, False, plane.level, (plane.b_name,), [plane.b], residue=(k, copies))

    def gather(self, output: str, ids: str) -> Layout | str:
        """The embedding layout producing `output` (GatherBlockQuantized planes, minimums subtracted, Reshape)."""
        node = self.producer.get(output)
        if node is not None and node.op_type == "Gather":
            return "float Gather (not quantized)"
        if node is None or node.op_type != "Reshape":
            return "not computed by a known layout"
        summed, offset = node.input[0], None
        sub = self.producer.get(summed)
        if sub is not None and sub.op_type == "Sub":
            unsq = self.producer.get(sub.input[1])
            gathered = self.producer.get(unsq.input[0]) if unsq is not None and unsq.op_type == "Unsqueeze" else None
            if gathered is None or gathered.op_type != "Gather" or gathered.input[1] != ids:
                return "embedding minimums in a form this reader does not know"
            neg = self.value(gathered.input[0])
            if neg is None:
                return "embedding minimums in a form this reader does not know"
            offset, summed = ((-neg).astype(np.float32), None), sub.input[0]
        planes = []
        for term in self.terms(summed):
            gbq = self.producer.get(term)
            if gbq is None or gbq.op_type != "GatherBlockQuantized" or gbq.input[1] != ids:
                return "not a GatherBlockQuantized layout"
            a = self.attrs(gbq)
            if a.get("gather_axis", 0) != 0 or a.get("quantize_axis") != 2:
                return "GatherBlockQuantized on another axis"
            reshape = self.producer.get(gbq.input[2])
            if reshape is None or reshape.op_type != "Reshape" or gbq.input[0] not in self.inits:
                return "GatherBlockQuantized with inputs this reader does not know"
            rows = int(self.inits[gbq.input[0]].dims[0])
            plane = self._plane(gbq.input[0], reshape.input[0], gbq.input[3] if len(gbq.input) > 3 else "",
                                int(a.get("bits", 4)), int(a.get("block_size", 0)), rows, None, packed_zero=False)
            if plane is None:
                return "GatherBlockQuantized with inputs this reader does not know"
            planes.append(plane)
        return self._combine(planes, offset, gather=True)

    def _combine(self, planes: list[_Plane], offset, gather: bool) -> Layout | str:
        """The planes (and minimums) back into the Blocks `pack_blocks` wrote them from."""
        if not planes:
            return "no quantized plane"
        first = planes[0]
        minimum, centred = offset if offset is not None else (None, None)
        if minimum is not None and minimum.shape != first.scale.shape:
            return "block minimums of another shape"
        codes = _unpack(first.b, first.bits)
        b_names, b_arrays = tuple(p.b_name for p in planes), [p.b for p in planes]
        if len(planes) == 1:
            zero = first.zero
            if first.bits == 4 and minimum is not None:
                if gather:  # the gather plane keeps its zero points of 0 in both forms; the minimums carry the rest
                    single = False
                elif _is_zeros(zero) and centred is None:
                    single = False
                elif zero is None and centred == first.scale_name:
                    single = True
                else:
                    return "4-bit plane with minimums in a form this reader does not know"
                blocks = Blocks("carried", 4, first.block, codes, first.scale, minimum)
            elif isinstance(zero, np.ndarray):
                if minimum is not None:
                    return "zero points and minimums together"
                blocks, single = Blocks("carried", first.bits, first.block, codes, first.scale, None, zero), first.bits == 8
            elif zero is None or (gather and _is_zeros(zero) and first.bits == 4):
                if _is_zeros(zero):  # codes against zero point 0 without minimums: no pack_blocks form
                    return "4-bit codes against zero point 0 without minimums"
                if minimum is not None and (first.bits != 8 or centred is not None):
                    return "minimums in a form this reader does not know"
                blocks, single = Blocks("carried", first.bits, first.block, codes, first.scale, minimum), first.bits == 8
            else:
                return "zero points in a form this reader does not know"
            return Layout(blocks, single, first.level, b_names, b_arrays)
        if len(planes) == 2:  # 8-bit codes as two exact 4-bit planes: lo (zero point 0) + 16 * (hi - 8)
            lo, hi = planes
            if not (lo.bits == hi.bits == 4 and _is_zeros(lo.zero) and hi.zero is None and lo.block == hi.block
                    and lo.b.shape == hi.b.shape and centred is None and self._times16(hi.scale_name, lo.scale_name)):
                return "two planes in a form this reader does not know"
            codes = (codes + 16 * _unpack(hi.b, 4)).astype(np.uint8)
            return Layout(Blocks("carried", 8, lo.block, codes, lo.scale, minimum), False, lo.level, b_names, b_arrays)
        return f"{len(planes)} planes"

    def _times16(self, name: str, base: str) -> bool:
        node = self.producer.get(name)
        return node is not None and node.op_type == "Mul" and node.input[0] == base and _scalar_is(self.value(node.input[1]), 16.0)


def _is_zeros(zero) -> bool:
    """A plane's zero points made by ConstantOfShape 0 (see LayoutReader.zero), not an array of them."""
    return isinstance(zero, str) and zero == "zeros"


def _scalar_is(values, expected: float) -> bool:
    return values is not None and values.size == 1 and float(values.reshape(-1)[0]) == expected


def _tensor_values(tensor):
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _unpack(b: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits B [N, k_blocks, blob] -> codes [N, K] (the inverse of cpu_layout.pack_codes)."""
    rows = b.shape[0]
    if bits == 4:
        return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(rows, -1)
    return b.reshape(rows, -1).copy()


# ----------------------------------------------------------------------------------------------
# Carrying
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """Rows [start, stop) of a source weight."""

    site: Site
    start: int
    stop: int
    whole: bool  # all of the source weight's rows

    def label(self) -> str:
        return self.site.node if self.whole else f"{self.site.node}[{self.start}:{self.stop}]"


@dataclass
class _Plan:
    """One builder weight and the source rows it equals: one whole source weight, several stacked (the builder's
    fused q/k/v), or a row range of one (Phi-3's fused gate/up projection, which the builder splits)."""

    site: Site
    parts: list[_Part]
    form: tuple | None = None  # the parts' common block form, once their layouts were read
    b_names: tuple[str, ...] = ()  # the source initializers holding the (single) part's codes
    shares_lm_head: Site | None = None  # an embedding carried as GatherBlockQuantized on this lm_head's blocks


@dataclass
class CarryResult:
    reused: list[dict] = field(default_factory=list)
    not_reused: list[dict] = field(default_factory=list)  # builder weights quantized with the scheme, and why
    scheme_facts: dict | None = None
    seconds: dict = field(default_factory=dict)

    def facts(self) -> dict:
        return {
            "reused_from_source": len(self.reused), "quantized_again": len(self.not_reused),
            "reused": self.reused, "not_reused": self.not_reused, "seconds": self.seconds,
        }


def _index_source(fp32_model, fp32_store) -> tuple[dict, dict, dict]:
    """The fp32 export's weights by signature (whole weight), their row digests, and where each MatMul row is
    ((K, row digest) -> [(weight, row)]), to find weights the builder stacks or splits."""
    digests = RowDigests(fp32_model, fp32_store)
    by_signature: dict[bytes, list[Site]] = {}
    rows_of: dict[str, list[bytes]] = {}
    where: dict[tuple[int, bytes], list[tuple[Site, int]]] = {}
    for site in weight_sites(fp32_model):
        rows = digests.rows(site.init, site.transposed)
        by_signature.setdefault(signature(rows), []).append(site)
        if site.kind == "matmul" and site.node not in rows_of:
            rows_of[site.node] = rows
            k = int(digests.inits[site.init].dims[0 if site.transposed else 1])
            for i, row in enumerate(rows):
                where.setdefault((k, row), []).append((site, i))
    return by_signature, rows_of, where


def _match(site: Site, rows: list[bytes], k: int, by_signature, rows_of, where) -> list[_Part] | None:
    """The source rows `rows` equal: a whole weight of the same kind, else (MatMul weights) consecutive row ranges
    of source MatMul weights, each running to the end of its weight or of `rows`."""
    same_kind = [s for s in by_signature.get(signature(rows), []) if s.kind == site.kind]
    if same_kind:
        return [_Part(same_kind[0], 0, len(rows), True)]
    if site.kind != "matmul":
        return None
    parts, start = [], 0
    while start < len(rows):
        for candidate, offset in where.get((k, rows[start]), []):
            source = rows_of[candidate.node]
            count = min(len(source) - offset, len(rows) - start)
            if signature(rows[start:start + count]) == signature(source[offset:offset + count]):
                parts.append(_Part(candidate, offset, offset + count, offset == 0 and count == len(source)))
                start += count
                break
        else:
            return None
    return parts


def carry_quantized_weights(builder_onnx: Path, quantized_onnx: Path, fp32_onnx: Path, scheme, out_onnx: Path, work: Path,
                            status=None) -> CarryResult | None:
    """Write `out_onnx`: the builder graph with the quantized export's weights wherever the fp32 export has an
    equal weight, and `scheme` applied (HQQ/RTN, tensor by tensor) to the rest. None when the rest needs a
    scheme that calibrates through the whole graph (GPTQ, k-quant): then the caller applies it to all."""
    import time

    import onnx

    from edgepack.quantize.external import TensorStore

    status = status or (lambda message: None)
    builder_onnx, quantized_onnx, fp32_onnx = Path(builder_onnx), Path(quantized_onnx), Path(fp32_onnx)
    result = CarryResult()
    model = onnx.load(str(builder_onnx), load_external_data=False)
    quantized = onnx.load(str(quantized_onnx), load_external_data=False)
    with TensorStore(builder_onnx.parent, work) as store, TensorStore(quantized_onnx.parent) as quantized_store:
        t0 = time.perf_counter()
        status("matching the fused graph's weights to the source's by content")
        fp32_model = onnx.load(str(fp32_onnx), load_external_data=False)
        with TensorStore(fp32_onnx.parent) as fp32_store:
            by_signature, rows_of, where = _index_source(fp32_model, fp32_store)
        del fp32_model
        sites = weight_sites(model)
        digests = RowDigests(model, store)
        plans: list[_Plan] = []
        for site in sites:
            rows = digests.rows(site.init, site.transposed)
            k = int(digests.inits[site.init].dims[0 if site.transposed else 1])
            parts = _match(site, rows, k, by_signature, rows_of, where)
            if parts is None:
                result.not_reused.append({"node": site.node, "why": "no equal weight in the fp32 export"})
            else:
                plans.append(_Plan(site, parts))
        del digests, by_signature, rows_of, where
        result.seconds["match"] = round(time.perf_counter() - t0, 3)
        reader = LayoutReader(quantized, quantized_store)
        plans = _check_layouts(plans, sites, reader, result)
        carried = {p.site.node for p in plans}
        rest = [s for s in sites if s.node not in carried and not (s.kind == "embedding" and s.transposed)]
        if rest:
            if getattr(scheme, "algorithm", "rtn") not in ("hqq", "rtn"):
                return None
            t0 = time.perf_counter()
            status(f"applying {scheme.label()} to the {len(rest)} weights the source has no equal of")
            model = _apply_to_rest(model, scheme, carried, store, result)
            result.seconds["quantize_rest"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        status(f"writing the source's quantized blocks for {len(plans)} weights")
        _write(model, plans, reader, store, result)
        store.save(model, out_onnx)
        result.seconds["write"] = round(time.perf_counter() - t0, 3)
    return result


def _read(reader: LayoutReader, part: _Part) -> Layout | str:
    """The part's rows of its source layout (every block lies within one row, so a row range is exact)."""
    site = part.site
    layout = reader.matmul(site.output, site.activation) if site.kind == "matmul" else reader.gather(site.output, site.activation)
    if isinstance(layout, str) or part.whole:
        return layout
    if layout.blocks.rows < part.stop:
        return "fewer rows than the fp32 weight"
    rows = slice(part.start, part.stop)
    b = layout.blocks
    pick = lambda a: None if a is None else a[rows]  # noqa: E731
    layout.blocks = Blocks(b.source, b.bits, b.block, b.codes[rows], b.scale[rows], pick(b.offset), pick(b.zero))
    layout.b_arrays = [a[rows] for a in layout.b_arrays]
    return layout


def _form(layout: Layout) -> tuple:
    b = layout.blocks
    zero = "array" if isinstance(b.zero, np.ndarray) else None
    return (b.bits, b.block, b.cols, b.offset is None, zero, layout.single_8bit, layout.accuracy_level, layout.residue)


def _check_layouts(plans: list[_Plan], sites: list[Site], reader: LayoutReader, result: CarryResult) -> list[_Plan]:
    """Keep the plans whose source layouts can be read (and, stacked, share one block form); the rest go to the
    scheme. Layouts are read here only to be checked: they are read again, one weight at a time, when written.

    A tied table (the builder's Gather(Transpose(lm_head weight))) keeps its lm_head company: an lm_head
    carried without its embedding would leave the float table to an embedding the scheme can no longer
    quantize (unless the source kept its embedding float too).
    """
    kept, why_not = [], {}
    for plan in plans:
        forms, why = [], None
        for part in plan.parts:
            layout = _read(reader, part)
            if isinstance(layout, str):
                why = f"{part.label()}: {layout}"
                break
            forms.append(_form(layout))
            plan.b_names = layout.b_names
            del layout
        if why is None and len(set(forms)) > 1:
            why = "the stacked source weights have different block forms"
        if why is not None:
            why_not[plan.site.node] = why
            result.not_reused.append({"node": plan.site.node, "why": why})
            continue
        plan.form = forms[0]
        kept.append(plan)
    heads = {p.site.init: p for p in kept if p.site.kind == "matmul" and len(p.parts) == 1 and p.parts[0].whole}
    for plan in kept:
        head = heads.get(plan.site.init) if plan.site.kind == "embedding" and plan.site.transposed else None
        if head is not None and head.b_names == plan.b_names:
            plan.shares_lm_head = head.site
    carried = {p.site.node for p in kept}
    tied = {s.init: s for s in sites if s.kind == "embedding" and s.transposed}
    dropped = set()
    for plan in kept:
        table = tied.get(plan.site.init) if plan.site.kind == "matmul" else None
        if table is not None and table.node not in carried and "float Gather" not in why_not.get(table.node, ""):
            dropped.add(plan.site.node)
            result.not_reused.append({"node": plan.site.node, "why": f"its tied embedding {table.node} is not carried"})
    return [p for p in kept if p.site.node not in dropped]


def _apply_to_rest(model, scheme, carried: set[str], store, result: CarryResult):
    """The scheme on every weight not carried: carried nodes are hidden from it (an op type it does not touch)."""
    from edgepack.quantize.weight_only import quantize_weight_only

    hidden = {}
    for node in model.graph.node:
        if node.name in carried:
            hidden[node.name] = node.op_type
            node.op_type = _CARRIED + node.op_type
    model, result.scheme_facts = quantize_weight_only(model, scheme, store=store)
    for node in model.graph.node:  # the quantizer may have copied the node messages: restore by name
        if node.name in hidden and node.op_type.startswith(_CARRIED):
            node.op_type = hidden[node.name]
    return model


def _concat_rows(blocks: list[Blocks]) -> Blocks:
    first = blocks[0]
    stack = lambda name: None if getattr(first, name) is None else np.concatenate([getattr(b, name) for b in blocks])  # noqa: E731
    return Blocks(first.source, first.bits, first.block, stack("codes"), stack("scale"), stack("offset"), stack("zero"))


def _write(model, plans: list[_Plan], reader: LayoutReader, store, result: CarryResult) -> None:
    """Each plan's blocks into the graph with cpu_layout's writers, one weight in memory at a time (an embedding
    sharing an lm_head's blocks right after it); the float weights they replace go."""
    g = GraphEdit(model, const_prefix="carried", store=store)
    nodes = {n.name: n for n in g.graph.node}
    sharing = {p.shares_lm_head.node: p for p in plans if p.shares_lm_head is not None}
    removed: set[str] = set()

    def record(plan: _Plan, written: int) -> None:
        removed.add(plan.site.init)
        result.reused.append({"node": plan.site.node, "from": [p.label() for p in plan.parts], "bits": plan.form[0],
                              "block_size": plan.form[1], "bytes": written,
                              **({"shares_blocks_with": plan.shares_lm_head.node} if plan.shares_lm_head else {})})

    for plan in plans:
        if plan.shares_lm_head is not None:
            continue  # written with its lm_head
        node, site = nodes[plan.site.node], plan.site
        layouts = [_read(reader, part) for part in plan.parts]
        if any(isinstance(layout, str) or _form(layout) != plan.form for layout in layouts):
            raise AssertionError(f"the source layouts of {site.node} changed between two reads")
        first = layouts[0]
        blocks = first.blocks if len(layouts) == 1 else _concat_rows([layout.blocks for layout in layouts])
        if first.residue is not None:
            g.replacements[id(node)], b_name, written = _residue_nodes(g, node, blocks, first.residue, first.accuracy_level)
            _check_codes(g, [b_name], layouts)
            record(plan, written)
            del blocks, layouts, first
            continue
        packed = pack_blocks(g, blocks, f"{site.node}.carried", single_8bit=first.single_8bit)
        _check_codes(g, [plane.b for plane in packed.planes], layouts)
        if site.kind == "matmul":
            g.replacements[id(node)] = matmul_nbits_nodes(g, node, packed, first.accuracy_level)
        else:
            g.replacements[id(node)] = gather_block_quantized_nodes(g, node, packed)
        record(plan, packed.bytes)
        embedding = sharing.get(site.node)
        if embedding is not None:  # stored once: the embedding gathers the lm_head's blocks
            g.replacements[id(nodes[embedding.site.node])] = gather_block_quantized_nodes(g, nodes[embedding.site.node], packed)
            record(embedding, 0)
        del blocks, layouts, first, packed
    g.finish(removed)
    _drop_unused(g)


def _drop_unused(g: GraphEdit) -> None:
    """What the writers made that no node reads: `pack_blocks` writes a weight's zero points in both the MatMulNBits
    and the GatherBlockQuantized shape, and only a weight that is also an embedding uses the second."""
    made = {t.name for t in g.new_inits}
    prefix = {n.name for n in g.prefix_nodes}  # (the graph holds copies of these messages: match by name)
    graph_outputs = {o.name for o in g.graph.output}
    while True:
        used = {i for n in g.graph.node for i in n.input} | graph_outputs
        dead = [n for n in g.graph.node if n.name in prefix and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            g.graph.node.remove(node)
    used = {i for n in g.graph.node for i in n.input} | graph_outputs
    keep = [t for t in g.graph.initializer if t.name in used or t.name not in made]
    del g.graph.initializer[:]
    g.graph.initializer.extend(keep)


def _residue_nodes(g: GraphEdit, node, blocks: Blocks, residue: tuple[int, int], level) -> tuple[list, str, int]:
    """MatMul(A, W) -> MatMulNBits(Concat(A, block sums...), codes with residue columns): the nodes
    `cpu_layout.offset_column_nodes` writes, from the codes, scales and zero points it wrote (carried as they are)."""
    from onnx import helper

    from edgepack.quantize.cpu_layout import pack_codes, with_block_sums

    k, copies = residue
    rows, block = blocks.rows, blocks.block
    a, y = node.input[0], node.output[0]
    base = f"{node.name or y}.carried"
    nodes, widened = with_block_sums(g, a, k, block, copies)
    nbt = blocks.scale.shape[1]
    packed = pack_codes(blocks.codes.reshape(rows, nbt, block), 4)
    z = np.pad(blocks.zero, ((0, 0), (0, nbt % 2)))
    z = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    scale_name, scale_bytes = g.float_init(blocks.scale, base + "_scales")
    b_name = g.add_init(packed, base + "_B")
    inputs = [widened, b_name, scale_name, g.add_init(z, base + "_zero_points")]
    nodes.append(helper.make_node("MatMulNBits", inputs, [y], name=g.unique((node.name or y) + "_Q"), domain=MS_DOMAIN,
                                  bits=4, K=blocks.cols, N=rows, block_size=block, accuracy_level=int(level if level is not None else 4)))
    return nodes, b_name, packed.nbytes + scale_bytes + z.nbytes


def _check_codes(g: GraphEdit, b_names: list[str], layouts: list[Layout]) -> None:
    """The written planes hold the source's own code bytes (row blocks of them, for a stacked weight)."""
    written = {t.name: t for t in g.new_inits}
    for i, name in enumerate(b_names):
        b = g.store.array(written[name])
        start = 0
        for layout in layouts:
            source = layout.b_arrays[i]
            if not np.array_equal(b[start:start + source.shape[0]].reshape(source.shape), source):
                raise AssertionError(f"carried codes of {name} differ from the source's {layout.b_names[i]}")
            start += source.shape[0]
