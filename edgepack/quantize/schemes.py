"""Quantization schemes as values: a name plus typed parameters, printed, saved and compared.

A scheme is written verbatim into `quantize.json` (and later into the bundle manifest), so two
artifacts made with the same scheme value are made the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from edgepack.errors import UsageError
from edgepack.options import option

INT4_ALGORITHMS = ("rtn", "hqq", "gptq", "k-quant")
EMBEDDING_PRECISIONS = ("int4", "int8", "fp32")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
STATIC_METHODS = ("minmax", "percentile")


def check_block_size(block_size: int) -> int:
    if block_size < 16 or block_size & (block_size - 1):
        raise UsageError(f"block size {block_size} is not a power of two >= 16 (use 16, 32, 64 or 128)")
    return block_size


def check_regexes(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--keep-8bit {pattern!r} is not a valid regular expression: {exc}") from None
    return tuple(patterns)


@dataclass(frozen=True)
class SchemeOptions:
    """Every scheme parameter, declared once: `edgepack quantize` takes each as an option (unset: the scheme's
    own default) and a recipe's `[[quantize]]` table takes the parameters of its scheme as keys, checked alike."""

    block_size: int | None = option(None, help="int4/int8-weight block size: 16, 32 (default), 64 or 128.")
    symmetric: bool | None = option(None, cli="--symmetric/--asymmetric",
                                    help="int4/int8-weight: symmetric blocks, or with zero points (int4 default: asymmetric).")
    algorithm: str | None = option(None, choices=INT4_ALGORITHMS, help="int4 algorithm (default hqq: float zero points, no calibration).")
    accuracy_level: int | None = option(None, min=0, max=4,
                                        help="MatMulNBits accuracy_level: 0 = exact float compute (default for every scheme), "
                                             "4 = int8 activations inside the kernel (faster, approximate).")
    embeddings: str | None = option(None, choices=EMBEDDING_PRECISIONS, help="Embedding table precision (default int8; "
                                    "int8-dynamic takes int8 or int4).")
    lm_head: str | None = option(None, choices=EMBEDDING_PRECISIONS, help="int4: lm_head precision, tied or not (default int8).")
    keep_8bit: tuple[str, ...] = option(default_factory=tuple, metavar="REGEX",
                                        help="int4: nodes whose name matches stay 8-bit (repeatable), e.g. 'layers\\.0/'.")
    activations: str | None = option(None, choices=("uint8", "uint16"), help="int8-static activation type (default uint16).")
    weights: str | None = option(None, choices=("int8", "uint8"), help="int8-static weight type (default int8).")
    per_channel: bool | None = option(None, cli="--per-channel/--per-tensor",
                                      help="int8-dynamic/int8-static weight granularity (default per channel).")
    smooth: float | None = option(None, min=0, max=1, help="int8-dynamic: SmoothQuant strength (0-1): activation outlier "
                                  "channels scaled into the weights before per-tensor quantization (default off; encoders 0.6).")
    sensitive_8bit: float | None = option(None, min=0, max=1, help="int8-dynamic: fraction of MatMul inputs whose per-tensor "
                                          "int8 range is worst kept as 8-bit weight-only (default 0; encoders 0.125).")
    calibration_samples: int | None = option(None, min=1, help="Calibration windows (default 16 static and int8-dynamic smoothing, 8 GPTQ).")
    allow_requantize: bool = option(False, help="gguf: re-quantize tensor types that cannot be imported losslessly instead of failing.")
    method: str | None = option(None, choices=STATIC_METHODS, in_cli=False, help="int8-static calibration method (default minmax).",
                                note="recipe only: minmax is the method the quality figures are measured with")
    keep_io_types: bool | None = option(None, in_cli=False, help="fp16: keep fp32 model inputs and outputs (default true).",
                                        note="recipe only: fp32 inputs and outputs are what every runner feeds")


@dataclass(frozen=True)
class QualityOptions:
    """`edgepack quantize`'s calibration text, quality report and gate; a recipe's [calibration] text and
    [evaluation] table (recipe.py maps its keys onto these fields)."""

    calibration_text: Path | None = option(None, help="UTF-8 text for int8-static/GPTQ calibration (default: bundled English text).")
    eval_text: Path | None = option(None, help="UTF-8 text for the quality report (default: bundled English text).")
    eval_tokens: int = option(512, min=16, help="Token positions scored for quality.")
    evaluate: bool = option(True, cli="--no-eval", help="Skip the quality report (no gate possible).", in_recipe=False,
                            note="a recipe's schemes are always evaluated: the bundle reports their quality")
    max_kl: float | None = option(None, min=0, help="Gate: mean KL(fp32 || quantized) at most X.")
    min_top1: float | None = option(None, min=0, max=1, help="Gate: top-1 agreement with fp32 at least Y.")
    max_ppl_ratio: float | None = option(None, min=0, help="Gate: perplexity / fp32 perplexity at most Z.")
    min_cosine: float | None = option(None, min=-1, max=1, help="Gate (encoders): min cosine of sentence embeddings "
                                      "(token embeddings without a sentence output) against fp32 at least C.")


@dataclass(frozen=True)
class Scheme:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def to_json(self) -> dict:
        return {"name": self.name, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}}

    def label(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.to_json().items() if k != "name" and v not in ((), [], None))
        return f"{self.name}({params})" if params else self.name


@dataclass(frozen=True)
class Int8Dynamic(Scheme):
    """onnxruntime quantize_dynamic: int8 weights, activations quantized per tensor at run time."""

    name: ClassVar[str] = "int8-dynamic"
    summary: ClassVar[str] = "onnxruntime quantize_dynamic (QOperator), weights int8 in a 7-bit range, uint8 activations per tensor at run time"
    per_channel: bool = True
    smooth: float | None = None  # SmoothQuant migration strength (quantize/smooth.py); None: off
    sensitive_8bit: float = 0.0  # fraction of MatMul inputs worst resolved per tensor kept as 8-bit weight-only
    embeddings: str = "int8"  # int8: quantize_dynamic's per-tensor tables; int4: the largest table in 4-bit blocks of 16
    calibration_samples: int = 16  # windows of the calibration text for smooth / sensitive_8bit


# Encoders (feature extraction) quantized without --scheme: one activation scale per tensor cannot hold BERT-style
# outlier channels, so they are smoothed into the weights, the eighth of the MatMul inputs it still resolves worst
# stay float, and the word table (half an encoder's weights) is 4-bit (docs/benchmarks.md#encoder).
ENCODER_DEFAULT_OPTIONS = {"smooth": 0.6, "sensitive_8bit": 0.125, "embeddings": "int4"}


@dataclass(frozen=True)
class Int8Weight(Scheme):
    """Weight-only 8-bit: MatMulNBits bits=8, activations stay float."""

    name: ClassVar[str] = "int8-weight"
    summary: ClassVar[str] = "weight-only 8-bit blocks, run exactly as two 4-bit MatMulNBits planes; float activations"
    block_size: int = 32
    symmetric: bool = True
    # 0 = float compute: the 8-bit codes run as two exact 4-bit planes (cpu_layout), faster than fp32.
    # Level 4 keeps one 8-bit plane but quantizes activations to int8 per block inside MatMulNBits,
    # which adds an activation rounding error on top of the weights' (lower top-1, higher KL).
    accuracy_level: int = 0
    embeddings: str = "int8"


@dataclass(frozen=True)
class Int8Static(Scheme):
    """QDQ with calibration over real token sequences (KV-cache inputs included)."""

    name: ClassVar[str] = "int8-static"
    summary: ClassVar[str] = "QDQ static quantization, calibrated on real text through the KV-cache graph"
    activations: str = "uint16"
    weights: str = "int8"
    per_channel: bool = True
    calibration_samples: int = 16
    method: str = "minmax"


@dataclass(frozen=True)
class Int4(Scheme):
    """Block-wise weight-only 4-bit (MatMulNBits)."""

    name: ClassVar[str] = "int4"
    summary: ClassVar[str] = "block-wise weight-only 4-bit (MatMulNBits, integer zero points + exact block minimums); float activations"
    block_size: int = 32
    symmetric: bool = False
    algorithm: str = "hqq"
    # 0 = float compute: the model computes exactly with its quantized weights. 4 = int8 activations
    # inside MatMulNBits: faster decode (integer kernels), approximate (activations rounded as well).
    # benchmarks/quality.py and decode.py measure both.
    accuracy_level: int = 0
    embeddings: str = "int8"
    lm_head: str = "int8"
    keep_8bit: tuple[str, ...] = field(default_factory=tuple)
    calibration_samples: int = 8


@dataclass(frozen=True)
class Fp16(Scheme):
    name: ClassVar[str] = "fp16"
    summary: ClassVar[str] = "float16 weights and activations (onnxruntime float16 converter), fp32 inputs/outputs"
    keep_io_types: bool = True


@dataclass(frozen=True)
class Gguf(Scheme):
    """The GGUF source's own blocks as MatMulNBits weights: no second quantization."""

    name: ClassVar[str] = "gguf"
    summary: ClassVar[str] = ("the GGUF source's own quantized blocks written as MatMulNBits, no second quantization "
                              "(accuracy_level 0: the exact import)")
    # 0 (default): float compute, the ONNX model computes exactly what the GGUF holds (no loss against the GGUF).
    # 4: int8 activations inside MatMulNBits, as llama.cpp rounds them for its own dot products, and block minimums
    #    carried as residue columns: one kernel per weight instead of three, and the answers llama.cpp gives on these
    #    blocks, near-tie flips included, which is why it is not the default (docs/benchmarks.md#decode).
    accuracy_level: int = 0
    allow_requantize: bool = False


SCHEMES: dict[str, type[Scheme]] = {cls.name: cls for cls in (Int8Dynamic, Int8Weight, Int8Static, Int4, Fp16, Gguf)}
SCHEME_NAMES = (*SCHEMES, "auto")


def scheme_from_options(name: str, **options) -> Scheme:
    """Build a scheme from CLI-style options; options that do not apply to `name` are ignored unless set."""
    if name not in SCHEMES:
        raise UsageError(f"unknown scheme {name!r}; choose one of: {', '.join(SCHEME_NAMES)}")
    cls = SCHEMES[name]
    fields = {f for f in cls.__dataclass_fields__}
    values = {k: v for k, v in options.items() if k in fields and v is not None}
    if "block_size" in values:
        check_block_size(values["block_size"])
    if "keep_8bit" in values:
        values["keep_8bit"] = check_regexes(tuple(values["keep_8bit"]))
    if values.get("algorithm") not in (None, *INT4_ALGORITHMS):
        raise UsageError(f"unknown int4 algorithm {values['algorithm']!r}; choose one of {', '.join(INT4_ALGORITHMS)}")
    for key in ("embeddings", "lm_head"):
        if values.get(key) not in (None, *EMBEDDING_PRECISIONS):
            raise UsageError(f"--{key.replace('_', '-')} must be one of {', '.join(EMBEDDING_PRECISIONS)}")
    if name == "int8-dynamic" and values.get("embeddings") not in (None, "int8", "int4"):
        raise UsageError("int8-dynamic: --embeddings must be int8 or int4")
    if values.get("accuracy_level") not in (None, *ACCURACY_LEVELS):
        raise UsageError("--accuracy-level must be 0, 1, 2, 3 or 4")
    return cls(**values)


def auto_candidates(has_gguf_source: bool) -> list[Scheme]:
    """Candidates for `auto`, smallest first; the first that meets the quality budget wins."""
    candidates: list[Scheme] = []
    if has_gguf_source:
        candidates.append(Gguf())
    candidates += [Int4(algorithm="hqq", lm_head="int4"), Int4(algorithm="hqq"), Int8Weight(), Fp16()]
    return candidates
