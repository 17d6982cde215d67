"""Lossless GGUF import: the GGUF's own blocks in MatMulNBits / GatherBlockQuantized, checked against the fp32 export.

The fp32 export of a GGUF is its exact dequantization, so the imported model must give the same logits up
to float summation order. Tiny random llamas are written with GGUFWriter (tests/gguf_fixtures.py),
exported with `edgepack.convert.convert_model` (no parity check), then imported.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgepack.errors import BadInputError
from edgepack.quantize.gguf_import import import_gguf_weights, source_gguf
from tests.gguf_fixtures import TinyLlamaSpec, write_tiny_llama_gguf

# Every GGML type the importer takes exactly, in two models (K-quants need rows of 256).
LEGACY = TinyLlamaSpec(
    types={
        "attn_q": "Q4_0",
        "attn_k": "Q4_1",
        "attn_v": "Q5_0",
        "attn_output": "Q5_1",
        "ffn_gate": "Q8_0",
        "ffn_up": "Q4_1",
        "ffn_down": "Q4_0",
    },
    embedding="Q4_1",  # a 4-bit embedding with a block minimum: GatherBlockQuantized + gathered minimums
    overrides={"blk.1.attn_v": "F16"},  # float tensors stay float MatMul
)
KQUANTS = TinyLlamaSpec(
    hidden=256,
    ffn=512,
    types={
        "attn_q": "Q4_K",
        "attn_k": "Q6_K",
        "attn_v": "Q5_K",
        "attn_output": "Q3_K",
        "ffn_gate": "Q2_K",
        "ffn_up": "Q4_K",
        "ffn_down": "Q6_K",
    },
    embedding="Q6_K",  # an 8-bit embedding: two 4-bit planes shared with the lm_head
    seed=1,
)
UNSUPPORTED = TinyLlamaSpec(overrides={"blk.0.attn_q": "IQ4_NL"}, seed=2)  # non-uniform grid: no MatMulNBits form

# MatMulNBits nodes per weight: 8-bit codes run as two 4-bit planes (see gguf_import._pack).
PLANES = {"Q4_0": 1, "Q4_1": 1, "Q2_K": 1, "Q3_K": 1, "Q4_K": 1, "Q5_0": 2, "Q5_1": 2, "Q8_0": 2, "Q5_K": 2, "Q6_K": 2}
# Measured max |logit diff| / max |logit| is ~1e-6 (fp32 summation order only); 1e-4 leaves room across CPUs.
REL_TOL = 1e-4
PROMPT = [5, 17, 300, 42, 7, 99, 260, 3, 480, 11]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(name, spec) -> (gguf path, fp32 export folder), made once per module."""
    import os

    root = tmp_path_factory.mktemp("gguf-import")
    cache: dict[str, tuple[Path, Path]] = {}
    old = os.environ.get("EDGEPACK_CACHE")

    def build(name: str, spec: TinyLlamaSpec):
        if name not in cache:
            from edgepack.convert import ConvertConfig, convert_model

            gguf_path = write_tiny_llama_gguf(root / f"{name}.gguf", spec)
            os.environ["EDGEPACK_CACHE"] = str(root / "cache")  # the dequantized HF folder goes here
            try:
                convert_model(str(gguf_path), root / f"{name}-fp32", ConvertConfig(verify=False))
            finally:
                if old is None:
                    os.environ.pop("EDGEPACK_CACHE", None)
                else:
                    os.environ["EDGEPACK_CACHE"] = old
            cache[name] = (gguf_path, root / f"{name}-fp32")
        return cache[name]

    return build


def run_logits(onnx_path: Path, config: dict, prompt=PROMPT, steps: int = 6):
    """Prefill logits for every prompt position, then greedy decode steps; returns (logits [n, V], tokens)."""
    from edgepack.runtime.generate import DecoderSession
    from edgepack.runtime.session import create_session

    session = DecoderSession(create_session(onnx_path, threads=1), config)
    logits, cache = session.forward(prompt, session.empty_cache(), 0)
    rows, tokens, past = [logits], [], len(prompt)
    for _ in range(steps):
        token = int(np.argmax(logits[-1]))
        tokens.append(token)
        logits, cache = session.forward([token], cache, past)
        past += 1
        rows.append(logits)
    return np.concatenate(rows), tokens


def compare(fp32_dir: Path, imported: Path):
    config = json.loads((fp32_dir / "config.json").read_text())
    ref, ref_tokens = run_logits(fp32_dir / "model.onnx", config)
    got, got_tokens = run_logits(imported, config)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    return rel, ref, got, ref_tokens, got_tokens


def op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def expected_planes(spec: TinyLlamaSpec) -> tuple[int, int]:
    """(MatMulNBits nodes, quantized linear weights) the import must produce, lm_head included."""
    linear = [t for t in spec.linear_types().values() if t in PLANES]
    return sum(PLANES[t] for t in linear) + PLANES[spec.embedding], len(linear) + 1


@pytest.mark.parametrize("name,spec", [("legacy", LEGACY), ("kquants", KQUANTS)])
def test_import_is_lossless(built, tmp_path, name, spec):
    gguf_path, fp32_dir = built(name, spec)
    assert source_gguf(fp32_dir) == gguf_path.resolve()
    out = tmp_path / "model.onnx"
    result = import_gguf_weights(fp32_dir / "model.onnx", gguf_path, out)

    nodes, linear = expected_planes(spec)
    assert result.matmuls_replaced == linear
    assert result.unmatched == [] and result.requantized == []
    counts = op_counts(out)
    assert counts["MatMulNBits"] == nodes
    assert counts.get("GatherBlockQuantized", 0) == PLANES[spec.embedding]
    kept = [k for k, t in spec.linear_types().items() if t not in PLANES]
    assert len(result.matmuls_kept_float) == len(kept)
    expected_types = Counter(spec.linear_types().values())
    expected_types[spec.embedding] += 1
    assert result.gguf_types == dict(expected_types)

    # Embedding and tied lm_head: one set of blocks, read by both ops; the fp32 table is gone.
    assert result.embedding["op"] == "GatherBlockQuantized" and result.lm_head["op"] == "MatMulNBits"
    assert result.embedding["shares_weights_with"] == "lm_head"
    model = onnx.load(str(out))
    gather_data = {n.input[0] for n in model.graph.node if n.op_type == "GatherBlockQuantized"}
    lm_head_b = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")}
    assert gather_data == lm_head_b == set(result.embedding["weight_initializers"])
    float_tables = [i for i in model.graph.initializer if list(i.dims) == [spec.vocab, spec.hidden]]
    assert float_tables == []

    rel, ref, got, ref_tokens, got_tokens = compare(fp32_dir, out)
    assert rel <= REL_TOL, f"max |logit diff| / max |logit| = {rel:.2e}"
    assert got_tokens == ref_tokens
    assert (np.argmax(got, -1) == np.argmax(ref, -1)).all()
    # The weights are stored as the GGUF stores them (plus graph overhead): much smaller than fp32.
    assert result.bytes < 0.45 * result.bytes_in
    report = result.to_json()
    json.dumps(report)
    # Graph and weights beside it (model.onnx.data): the report counts both.
    assert report["bytes"] == out.stat().st_size + out.with_name(out.name + ".data").stat().st_size


def test_legacy_blocks_take_gguf_bytes(built, tmp_path):
    """Q4_0 / Q4_1 / Q8_0 blocks: codes + fp16 scales (+ fp16 minimums) are exactly the GGUF's bytes."""
    import gguf

    spec = TinyLlamaSpec(types={r: t for r, t in zip(TinyLlamaSpec().types, ["Q4_0", "Q4_1", "Q8_0", "Q4_0", "Q4_1", "Q8_0", "Q4_0"])})
    gguf_path, fp32_dir = built("bytes", spec)
    out = tmp_path / "model.onnx"
    import_gguf_weights(fp32_dir / "model.onnx", gguf_path, out)
    model = onnx.load(str(out))
    stored = sum(
        onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer if i.name.startswith("gguf.") and i.data_type != onnx.TensorProto.INT64
    )
    reader = gguf.GGUFReader(str(gguf_path))
    quantized = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)
    assert stored == quantized


def test_unsupported_type_raises_then_requantizes(built, tmp_path):
    gguf_path, fp32_dir = built("unsupported", UNSUPPORTED)
    out = tmp_path / "model.onnx"
    with pytest.raises(BadInputError, match=r"blk\.0\.attn_q\.weight \(IQ4_NL\)"):
        import_gguf_weights(fp32_dir / "model.onnx", gguf_path, out)
    assert not out.exists()

    result = import_gguf_weights(fp32_dir / "model.onnx", gguf_path, out, allow_requantize=True)
    assert [r["tensor"] for r in result.requantized] == ["blk.0.attn_q.weight"]
    assert result.requantized[0]["gguf_type"] == "IQ4_NL"
    nodes, linear = expected_planes(TinyLlamaSpec())  # IQ4_NL becomes one 4-bit RTN plane instead of Q4_0
    assert result.matmuls_replaced == linear
    assert op_counts(out)["MatMulNBits"] == nodes
    rel, *_ = compare(fp32_dir, out)
    assert rel < 0.05  # one tensor re-quantized to 4 bits: close, not exact


def test_accuracy_level_4_uses_single_8bit_weights(built, tmp_path):
    gguf_path, fp32_dir = built("legacy", LEGACY)
    out = tmp_path / "model.onnx"
    result = import_gguf_weights(fp32_dir / "model.onnx", gguf_path, out, accuracy_level=4)
    model = onnx.load(str(out))
    mnb = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(mnb) == result.matmuls_replaced  # one node per weight: 8-bit codes are not split
    assert all(a.i == 4 for n in mnb for a in n.attribute if a.name == "accuracy_level")
    rel, *_ = compare(fp32_dir, out)
    assert rel < 0.05  # int8 activations: close, not exact


@pytest.mark.parametrize("name,spec", [("legacy", LEGACY), ("kquants", KQUANTS)])
def test_accuracy_level_4_writes_block_minimums_as_residue_columns(built, tmp_path, name, spec):
    """Q4_1/Q4_K/Q2_K (w = s*u + m) at accuracy_level 4: one MatMulNBits over the activation widened by its
    block sums, no separate minimum MatMul + Add; the written weights match the GGUF's to the residue planes'
    precision, and the logits stay close (int8 activations are the remaining difference)."""
    gguf_path, fp32_dir = built(name, spec)
    out = tmp_path / "model.onnx"
    result = import_gguf_weights(fp32_dir / "model.onnx", gguf_path, out, accuracy_level=4)
    with_minimum = [t for t in spec.linear_types().values() if t in ("Q4_1", "Q4_K", "Q2_K")]
    assert result.offset_columns == len(with_minimum) > 0
    assert 0 < result.offset_columns_max_rel_error < 1e-3  # two residue planes: ~1/16 of one plane's error
    model = onnx.load(str(out), load_external_data=False)
    # The exact minimum term stays only where codes are 8-bit (Q5_1, Q5_K) and on a tied lm_head, whose blocks
    # the embedding's GatherBlockQuantized shares.
    exact_minimum = sum(t in ("Q5_1", "Q5_K") for t in spec.linear_types().values())
    exact_minimum += spec.embedding in ("Q4_1", "Q4_K", "Q2_K", "Q5_1", "Q5_K")
    assert len([n for n in model.graph.node if n.name.endswith("_OffsetMatMul")]) == exact_minimum
    widened = [n for n in model.graph.node if n.op_type == "MatMulNBits" and "_with_block_sums" in n.input[0]]
    assert len(widened) == len(with_minimum)
    rel, _, _, ref_tokens, got_tokens = compare(fp32_dir, out)
    assert rel < 0.05
    exact = tmp_path / "exact.onnx"
    import_gguf_weights(fp32_dir / "model.onnx", gguf_path, exact, accuracy_level=0)
    assert op_counts(out)["MatMulNBits"] < op_counts(exact)["MatMulNBits"] + op_counts(exact).get("MatMul", 0)


def test_wrong_gguf_is_refused(built, tmp_path):
    gguf_path, _ = built("legacy", LEGACY)
    _, other_dir = built("kquants", KQUANTS)
    with pytest.raises(BadInputError, match="not exported from this GGUF"):
        import_gguf_weights(other_dir / "model.onnx", gguf_path, tmp_path / "model.onnx")


@pytest.mark.demo
def test_demo_smollm2_import(smollm2_export, tmp_path):
    """SmolLM2-135M Q4_1 GGUF: the whole model.onnx within 100 MB, logits as the fp32 export's."""
    from edgepack.sources import DEMO_MODELS, find_demo_gguf

    fp32_dir = smollm2_export  # the session's export (read only)
    gguf_path = find_demo_gguf(DEMO_MODELS["smollm2-135m"])
    out = tmp_path / "q" / "model.onnx"
    result = import_gguf_weights(fp32_dir / "model.onnx", gguf_path, out)
    assert result.bytes <= 100_000_000
    assert result.gguf_types == {"Q4_1": 210, "Q8_0": 1}
    assert result.matmuls_replaced == 211 and result.unmatched == []
    assert result.embedding["shares_weights_with"] == "lm_head"

    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(str(fp32_dir))("The capital of France is")["input_ids"]
    config = json.loads((fp32_dir / "config.json").read_text())
    ref, ref_tokens = run_logits(fp32_dir / "model.onnx", config, prompt, steps=8)
    got, got_tokens = run_logits(out, config, prompt, steps=8)
    assert float(np.abs(got - ref).max()) <= 1e-3  # measured 1.3e-4 on logits up to ~35
    assert got_tokens == ref_tokens
