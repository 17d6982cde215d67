"""Compare the converted program with the fp32 PyTorch model on the evaluation text.

`mil-reference` (any host): the saved .mlpackage's MIL executed by `mil_reference`.
`coreml-runtime` (macOS only): `MLModel.predict` with a state from `make_state()`.
Decoders: a prefill of the first tokens, then single-token decode steps through the KV-cache state;
every position's logits are compared with PyTorch's teacher-forced logits: max |logit diff|, top-1
agreement, KL(fp32 || Core ML). Encoders: last hidden state, max |diff| and cosine per token.
"""

from __future__ import annotations

import platform
import time
from collections import Counter

import numpy as np

from edgepack.core.metrics import (
    cosine_per_position,
    kl_per_position,
    kl_summary,
    log_softmax,
    max_abs_diff,
    top1_agreement,
    top1_figures,
)


def fp16_logit_figures(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Logits of an fp16 program against fp32 ones: an overflow is reported (`finite`), not propagated."""
    candidate = candidate.astype(np.float32)
    finite = bool(np.isfinite(candidate).all())
    lp_ref, lp = log_softmax(reference), log_softmax(np.nan_to_num(candidate, nan=0.0, posinf=6e4, neginf=-6e4))
    return {
        "positions": int(reference.shape[0]),
        "finite": finite,
        "max_abs_logit_diff": max_abs_diff(reference, candidate) if finite else float("inf"),
        **top1_figures(lp_ref, top1_agreement(reference, candidate)),  # with its 95% interval and fp32's near ties
        **kl_summary(kl_per_position(lp_ref, lp)),
    }


def fp16_hidden_state_figures(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Per-token hidden states of an fp16 program against fp32 ones: an overflow is reported, not propagated."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    cos = cosine_per_position(ref, cand)
    finite = bool(np.isfinite(cand).all())
    return {
        "positions": int(ref.shape[0]),
        "finite": finite,
        "max_abs_diff": max_abs_diff(ref, cand) if finite else float("inf"),
        "cosine_mean": float(np.nan_to_num(cos).mean()),
        "cosine_min": float(np.nan_to_num(cos).min()),
    }


def causal_mask(q_len: int, end: int) -> np.ndarray:
    """Additive mask (1, 1, q, end): query i (at position end - q + i) sees keys 0..end-q+i."""
    past = end - q_len
    mask = np.zeros((q_len, end), dtype=np.float32)
    for i in range(q_len):
        mask[i, past + i + 1 :] = -np.inf
    return mask[None, None]


def decoder_steps(tokens: list[int], decode_steps: int):
    """(input_ids, causal_mask) feeds: one prefill, then `decode_steps` single tokens."""
    prefill = len(tokens) - decode_steps
    feeds = [(tokens[:prefill], prefill)]
    feeds += [([t], prefill + i + 1) for i, t in enumerate(tokens[prefill:])]
    for ids, end in feeds:
        yield {"input_ids": np.array([ids], dtype=np.int32), "causal_mask": causal_mask(len(ids), end)}


# Additive mask value of the fixed-shape (Neural Engine) program: finite, so that a row with nothing to attend
# (padding at the end of a partial prefill chunk) gives a uniform softmax rather than NaN; apple/ml-ane-transformers
# masks with -1e4 too.
MASK_MIN = -1e4
PREFILL, DECODE = "prefill", "decode"


def fixed_feed(ids: list[int], start: int, query: int, context: int) -> dict[str, np.ndarray]:
    """Inputs of one call of the fixed-shape program: `ids` (at most `query`) at cache slots start, start + 1, ...;
    a shorter chunk is padded (its padding rows write nothing and their logits are ignored)."""
    n = len(ids)
    if not 0 < n <= query or start + n > context:
        raise ValueError(f"{n} tokens at position {start} do not fit a call of {query} tokens over a cache of {context}")
    input_ids = np.zeros((1, query), dtype=np.int32)
    input_ids[0, :n] = ids
    positions = np.zeros((1, query, context), dtype=np.float16)
    positions[0, np.arange(n), start + np.arange(n)] = 1
    mask = np.full((1, 1, query, context), MASK_MIN, dtype=np.float16)
    for i in range(n):
        mask[0, 0, i, : start + i + 1] = 0
    return {"input_ids": input_ids, "causal_mask": mask, "positions": positions}


def fixed_decoder_steps(tokens: list[int], decode_steps: int, chunk: int, context: int):
    """(function, tokens in this call, feed): the prompt in prefill chunks of `chunk` tokens (the last one padded),
    then `decode_steps` single tokens; what an app does with the Neural Engine program."""
    prefill = len(tokens) - decode_steps
    for start in range(0, prefill, chunk):
        ids = tokens[start : min(start + chunk, prefill)]
        yield PREFILL, len(ids), fixed_feed(ids, start, chunk, context)
    for i, token in enumerate(tokens[prefill:]):
        yield DECODE, 1, fixed_feed([token], prefill + i, 1, context)


def joined_logits(outputs: dict) -> np.ndarray:
    """`logits`, or the vocabulary slices `logits_0`, `logits_1`, ... of a large vocabulary joined back."""
    if "logits" in outputs:
        return np.asarray(outputs["logits"])
    slices = sorted((name for name in outputs if name.startswith("logits_")), key=lambda name: int(name.rsplit("_", 1)[1]))
    return np.concatenate([np.asarray(outputs[name]) for name in slices], axis=-1)


def _through_parts(parts, feed: dict, run) -> dict:
    """One call through the parts of a model in order: each part's hidden states are the next part's input."""
    from edgepack.targets.coreml_support.convert import HIDDEN_IN, HIDDEN_OUT

    outputs = run(parts[0], feed)
    for part in parts[1:]:
        outputs = run(part, {HIDDEN_IN: outputs[HIDDEN_OUT], "causal_mask": feed["causal_mask"], "positions": feed["positions"]})
    return outputs


def run_fixed_decoder_mil(packages, tokens: list[int], decode_steps: int, chunk: int, context: int,
                          programs: list | dict | None = None) -> tuple[np.ndarray, dict]:
    """The Neural Engine program's prefill and decode functions (MIL reference), one shared KV state per package;
    `packages`: the package, or the packages of a split model in order (`programs`: those already loaded)."""
    from edgepack.targets.coreml_support.mil_reference import load_functions

    packages = list(packages) if isinstance(packages, (list, tuple)) else [packages]
    t0 = time.perf_counter()
    programs = [programs] if isinstance(programs, dict) else programs or [load_functions(p, (PREFILL, DECODE)) for p in packages]
    for part in programs:
        part[DECODE].reset()
    load_s = time.perf_counter() - t0
    logits = []
    t0 = time.perf_counter()
    for function, n, feed in fixed_decoder_steps(tokens, decode_steps, chunk, context):
        outputs = _through_parts(programs, feed, lambda part, inputs, function=function: part[function].run(inputs))
        logits.append(joined_logits(outputs)[0, :n])
    return np.concatenate(logits).astype(np.float32), {"load_s": round(load_s, 2), "run_s": round(time.perf_counter() - t0, 2)}


def run_fixed_decoder_coreml(packages, tokens: list[int], decode_steps: int, chunk: int, context: int, compute_units: str) -> np.ndarray:
    """The same on Core ML (macOS): each function loaded by name; per package, one state made by its decode
    function serves both functions."""
    import coremltools as ct

    units = getattr(ct.ComputeUnit, compute_units.upper())
    packages = list(packages) if isinstance(packages, (list, tuple)) else [packages]
    parts = []
    for package in packages:
        models = {name: ct.models.MLModel(str(package), compute_units=units, function_name=name) for name in (PREFILL, DECODE)}
        parts.append((models, models[DECODE].make_state()))
    logits = []
    for function, n, feed in fixed_decoder_steps(tokens, decode_steps, chunk, context):
        outputs = _through_parts(parts, feed, lambda part, inputs, function=function: part[0][function].predict(inputs, state=part[1]))
        logits.append(joined_logits(outputs)[0, :n])
    return np.concatenate(logits).astype(np.float32)


def _program(package_or_program):
    """A loaded MILProgram as it is, or the one a package path holds (reset: no state from earlier calls)."""
    from edgepack.targets.coreml_support.mil_reference import MILProgram, load_program

    if isinstance(package_or_program, MILProgram):
        package_or_program.reset()
        return package_or_program
    return load_program(package_or_program)


def run_decoder_mil(package, tokens: list[int], decode_steps: int) -> tuple[np.ndarray, dict]:
    """`package`: an .mlpackage path, or its program already loaded by `mil_reference.load_program`."""
    t0 = time.perf_counter()
    program = _program(package)
    load_s = time.perf_counter() - t0
    logits = []
    t0 = time.perf_counter()
    for feed in decoder_steps(tokens, decode_steps):
        logits.append(program.run(feed)["logits"][0])
    return np.concatenate(logits).astype(np.float32), {"load_s": round(load_s, 2), "run_s": round(time.perf_counter() - t0, 2)}


def run_decoder_coreml(package, tokens: list[int], decode_steps: int, compute_units: str) -> np.ndarray:
    import coremltools as ct

    units = getattr(ct.ComputeUnit, compute_units.upper())
    model = ct.models.MLModel(str(package), compute_units=units)
    state = model.make_state()
    logits = []
    for feed in decoder_steps(tokens, decode_steps):
        feed = {"input_ids": feed["input_ids"], "causal_mask": feed["causal_mask"].astype(np.float16)}
        logits.append(np.asarray(model.predict(feed, state=state)["logits"])[0])
    return np.concatenate(logits).astype(np.float32)


def run_encoder_mil(package, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`package`: an .mlpackage path, or its program already loaded by `mil_reference.load_program`."""
    program = _program(package)
    return program.run({"input_ids": ids, "attention_mask": mask})["last_hidden_state"][0].astype(np.float32)


def run_encoder_coreml(package, ids: np.ndarray, mask: np.ndarray, compute_units: str) -> np.ndarray:
    import coremltools as ct

    model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, compute_units.upper()))
    return np.asarray(model.predict({"input_ids": ids, "attention_mask": mask})["last_hidden_state"])[0].astype(np.float32)


def neural_engine_placement(package, compute_units: str) -> dict:
    """Where Core ML places each op (macOS: MLComputePlan of the compiled package): per function, the compute ops
    (constants excluded), how many prefer the Neural Engine, and the op types that do not."""
    import coremltools as ct
    from coremltools.models.compute_device import MLNeuralEngineComputeDevice
    from coremltools.models.compute_plan import MLComputePlan

    compiled = ct.models.utils.compile_model(str(package))
    plan = MLComputePlan.load_from_path(compiled, compute_units=getattr(ct.ComputeUnit, compute_units.upper()))
    placement = {}
    for name, function in plan.model_structure.program.functions.items():
        total, on_ne, elsewhere = 0, 0, Counter()
        for operation in function.block.operations:
            if operation.operator_name in ("const",) or operation.operator_name.startswith("constexpr_"):
                continue
            usage = plan.get_compute_device_usage_for_mlprogram_operation(operation)
            if usage is None:
                continue
            total += 1
            if isinstance(usage.preferred_compute_device, MLNeuralEngineComputeDevice):
                on_ne += 1
            else:
                elsewhere[f"{operation.operator_name} ({type(usage.preferred_compute_device).__name__})"] += 1
        placement[name] = {"compute_ops": total, "neural_engine": on_ne, "share": round(on_ne / total, 4) if total else 0.0,
                           "elsewhere": dict(elsewhere)}
    return {"measured_by": "MLComputePlan", "compute_units": compute_units, "functions": placement}


def coreml_runtime_available() -> tuple[bool, str]:
    if platform.system() != "Darwin":
        return False, f"Core ML runs only on macOS (this host is {platform.system()}); MLModel.predict needs libcoremlpython"
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError as exc:
        return False, f"coremltools has no native runtime here ({exc})"
    return True, ""
