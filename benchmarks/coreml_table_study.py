"""Study: can a 4-bit SmolLM2 Core ML package be <= 80 MB with top-1 >= 0.9 against fp32?

Not a test and not a Core ML build: it simulates, in PyTorch fp32, the weight formats Core ML's iOS 18
constexpr ops can hold, and scores each on the bundled evaluation text (top-1 agreement and KL against
the fp32 model, over all positions and over the first 64, the positions `edgepack target coreml`
verifies by default). Sizes are the measured non-table bytes of an `int4-block --embedding int8` package
(`--base-mb`, 67.63 MB: Q4_1 projections exactly, program, norms, RoPE tables) plus the table's bytes.

Projection formats (all 210 projection matrices, blocks of 32 along the input axis):
  exact  uint4 data, fp16 scale, fp16 offset: the GGUF's Q4_1 blocks, 5 bits/weight (what int4-block ships)
  res16  uint4 data, fp16 scale, uint4 offset (the rounded Q4_1 offset) and the rounding residue as int4
         sixteenths of the scale, applied through block sums of the activation: saves ~2.9 MB, needs
         three more ops per projection (the Core ML target's --integer-offsets)

Table formats (the tied embedding / lm_head, 49152 x 576):
  int8row           int8 with one scale per row (what --embedding int8 ships)
  split:F:B:LEVELS  ids < F int8 with a scale per 32; the other rows 3-bit indices into one global
                    8-level table (LEVELS: uniform | nf, normal-distribution quantiles) with an fp16
                    scale and offset per block of B, fitted by least squares weighted by E[h_k^2] of
                    the final hidden states on the calibration text. In Core ML: constexpr_lut_to_dense
                    (uint3 indices, int8 levels) feeding constexpr_blockwise_shift_scale's data, the
                    joint-compression pattern coremltools' palettize_weights(joint_compression=True) writes.

    python benchmarks/coreml_table_study.py ~/.cache/edgepack/bench-decode/export-fp32 \\
        exact/int8row exact/split:4000:32:nf res16/split:6000:64:nf res16/split:8000:64:nf

The table also goes to benchmarks/results/coreml-table-study.json for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _results
import numpy as np

DATA = Path(__file__).resolve().parents[1] / "edgepack" / "quantize" / "data"
def _levels() -> dict:
    from edgepack.targets.coreml_support.convert import SPLIT_LEVELS

    return {"uniform": np.arange(8.0), "nf": SPLIT_LEVELS.astype(np.float64)}  # nf: what `--embedding split` stores


def projection(weight: np.ndarray, fmt: str) -> np.ndarray:
    """A projection as the Core ML target stores it (coreml_support.convert.stored_projection)."""
    from edgepack.targets.coreml_support.convert import stored_projection

    return stored_projection(weight, 32, residue=fmt == "res16")


def int8_blocks(rows: np.ndarray, block: int = 32) -> np.ndarray:
    """The split table's int8 rows as the Core ML target stores them (coreml_support.convert.int8_blocks)."""
    from edgepack.targets.coreml_support.convert import int8_blocks as stored

    q, scale = stored(rows, block)
    return q.astype(np.float64) * scale.astype(np.float64).repeat(block, axis=1)


def lut3(rows: np.ndarray, block: int, levels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The split table's 3-bit rows as the Core ML target fits and stores them (coreml_support.convert.lut3_blocks)."""
    from edgepack.targets.coreml_support.convert import lut3_blocks

    index, scale, offset = lut3_blocks(rows, block, levels, weights)
    scale, offset = (a.astype(np.float64).repeat(block, axis=1) for a in (scale, offset))
    return scale * (levels.astype(np.float64)[index] - offset)


def kmeans_blocks(rows: np.ndarray, block: int, weights: np.ndarray, iters: int = 8) -> np.ndarray:
    """8 centroids per block (weighted Lloyd from quantile starts), stored as an int8 LUT per block with
    an fp16 scale and offset: constexpr_lut_to_dense whose lut is a constexpr_blockwise_shift_scale, the
    quantized-LUT pattern iOS 18 runs (coremltools reorders the cheaper LUT -> shift_scale chain into it
    before iOS 26)."""
    x = rows.reshape(-1, block)
    w = np.tile(weights.reshape(-1, block), (rows.shape[0], 1))
    out = np.empty_like(x)
    for i in range(0, len(x), 20000):
        xb, wb = x[i:i + 20000], w[i:i + 20000]
        c = np.quantile(xb, (np.arange(8) + 0.5) / 8, axis=1).T
        for _ in range(iters):
            a = np.abs(xb[:, :, None] - c[:, None, :]).argmin(-1)
            for j in range(8):
                m = (a == j) * wb
                c[:, j] = np.where(m.sum(1) > 0, (xb * m).sum(1) / np.maximum(m.sum(1), 1e-30), c[:, j])
        lo, hi = c.min(1, keepdims=True), c.max(1, keepdims=True)
        s = np.where(hi > lo, (hi - lo) / 255, 1.0)
        c = np.round((c - lo) / s) * s + lo  # int8 LUT entries
        a = np.abs(xb[:, :, None] - c[:, None, :]).argmin(-1)
        out[i:i + 20000] = np.take_along_axis(c, a, 1)
    return out.reshape(rows.shape)


def table(spec: str, E: np.ndarray, col_weights: np.ndarray) -> tuple[np.ndarray, float]:
    vocab, dim = E.shape
    if spec == "int8row":
        s = np.abs(E).max(1, keepdims=True) / 127
        return np.round(E / s) * s, (vocab * dim + vocab * 2) / 1e6
    _, f, b, levels = spec.split(":")
    f, b = int(f), int(b)
    if dim % b:
        raise SystemExit(f"block {b} does not divide the table's {dim} columns")
    T = E.copy()
    T[:f] = int8_blocks(E[:f])
    if levels == "kmeans":
        T[f:] = kmeans_blocks(E[f:], b, col_weights)
        return T, (f * dim * 8.5 + (vocab - f) * dim * (3 + 96 / b)) / 8 / 1e6
    T[f:] = lut3(E[f:], b, _levels()[levels], col_weights)
    return T, (f * dim * 8.5 + (vocab - f) * dim * (3 + 32 / b)) / 8 / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an `edgepack convert` folder of SmolLM2 (its convert.json names the HF folder)")
    parser.add_argument("variants", nargs="+", help="PROJ/TABLE, e.g. exact/int8row res16/split:6000:64:nf")
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--base-mb", type=float, default=67.63, help="non-table bytes of the exact-projection package")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = json.loads((args.export / "convert.json").read_text())["source"]["hf_dir"]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok((DATA / "eval_en.txt").read_text())["input_ids"][: args.positions]
    calib = tok((DATA / "calib_en.txt").read_text())["input_ids"][:512]

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(torch.tensor([ids[i:i + 512]])).logits[0].double() for i in range(0, len(ids), 512)])

    ref = logits()
    ref_lp, ref_top = torch.log_softmax(ref, -1), ref.argmax(-1)
    with torch.no_grad():
        hidden = model.model(torch.tensor([calib])).last_hidden_state[0].double().numpy()
    col_weights = (hidden ** 2).mean(0)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    res16_saving = 0.0
    for n, p in original.items():
        if n.endswith("proj.weight"):
            blocks = p.numel() / 32
            res16_saving += blocks * (2 - 0.5 - 0.5) / 1e6  # fp16 offset -> uint4 offset + int4 residue
    res16_saving -= 0.4  # block-sum indicator constants and three ops per projection in the program (estimate)

    print("| projections | table | package MB (est.) | top-1 | top-1 first 64 | first 256 | mean KL |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for variant in args.variants:
        proj, spec = variant.split("/")
        for n, p in model.named_parameters():
            if n.endswith("proj.weight"):
                p.data = torch.from_numpy(projection(original[n].numpy(), proj)).float()
        T, table_mb = table(spec, original["model.embed_tokens.weight"].numpy().astype(np.float64), col_weights)
        model.model.embed_tokens.weight.data = torch.from_numpy(T).float()  # tied: the lm_head reads it too
        out = logits()
        lp = torch.log_softmax(out, -1)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item()
        agree = (out.argmax(-1) == ref_top).double()
        base = args.base_mb - (res16_saving if proj == "res16" else 0.0)
        print(f"| {proj} | {spec} | {base + table_mb:.1f} | {agree.mean():.3f} | {agree[:64].mean():.3f} | {agree[:256].mean():.3f} | {kl:.4f} |", flush=True)
        rows.append({"projections": proj, "table": spec, "package MB (est.)": base + table_mb, "top-1": agree.mean().item(),
                     "top-1 first 64": agree[:64].mean().item(), "top-1 first 256": agree[:256].mean().item(), "mean KL": kl})
    _results.write("coreml-table-study", title="Core ML weight formats simulated in PyTorch fp32 (size against top-1)",
                   threads=torch.get_num_threads(), rows=rows,
                   conditions={"model": "SmolLM2-135M-Instruct", "positions": len(ids), "eval_text": "edgepack/quantize/data/eval_en.txt",
                               "base_mb": args.base_mb, "sizes": "estimated: base bytes plus the table's bytes"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
