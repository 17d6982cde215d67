"""Tokenizer checks run on every target bundle: the runtime that ships must tokenize as Hugging Face does.

A graph that passes every numerical check still produces nonsense when the app's tokenizer reads the
shipped tokenizer files differently from the tokenizer the model was checked with. So each target
tokenizes a fixed text sample (spaces, runs of spaces, newlines, tabs, digits, accents, CJK, emoji,
special tokens) with the tokenizer its apps use and compares the ids with Hugging Face's tokenizer of
the source folder:

  * `ort` / `ort-mobile`: onnxruntime-genai's own tokenizer (`og.Tokenizer(og.Model(bundle))`): encode,
    decode round trip, and its `apply_chat_template` against transformers' `apply_chat_template`.
  * Core ML / QNN: the bundle's tokenizer files loaded with `tokenizers` and with transformers, which
    is what swift-transformers and the Kotlin/Java bindings of Hugging Face's tokenizers mirror.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.errors import BadInputError

TOKENIZER_SAMPLE = (
    "Hello world",
    "The capital of France is Paris.\nThe capital of Italy is Rome.\n\n",
    "  two leading spaces, three   inside,\ttab and trailing  ",
    "Prices: 2024, 3.14159, 1,000,000 and -42.\n\n  1. first\t\t2. second   12345",
    "naïve café Ünïcödé — 日本語のテキスト, emoji 🙂👍🏽",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n",
)
CHAT_MESSAGES = [{"role": "user", "content": "Name three primary colors.\nAnswer  in one line: 1, 2, 3."}]
# How many differing samples a report lists (enough to diagnose, short enough to read).
_SHOWN = 3


def reference_tokenizer(folder: Path):
    """Hugging Face's tokenizer of the source folder, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # no tokenizer files at all: nothing to compare against
        return None


def _special_samples(reference) -> list[str]:
    """The sample plus a line with the tokenizer's own special tokens written out, as chat prompts carry them."""
    specials = [t for t in (reference.bos_token, reference.eos_token) if isinstance(t, str)]
    return list(TOKENIZER_SAMPLE) + ([f"{''.join(specials)}user\nHi{''.join(reversed(specials))}\n"] if specials else [])


def _reference_chat(reference) -> str | None:
    if not getattr(reference, "chat_template", None):
        return None
    from jinja2 import TemplateError

    try:
        return reference.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # the model folder's template: broken, or refusing a plain conversation
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise BadInputError(f"the model's chat template fails on a plain user turn: {reason}; an app using it would fail "
                            "the same way (fix chat_template in tokenizer_config.json or chat_template.jinja)") from exc


def check_genai_tokenizer(bundle: Path, reference) -> dict:
    """onnxruntime-genai's tokenizer of `bundle` against Hugging Face's `reference` tokenizer."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"passed": None, "skipped": "onnxruntime-genai is not installed"}
    if reference is None:
        return {"passed": None, "skipped": "the source has no tokenizer"}
    try:
        tokenizer = og.Tokenizer(og.Model(str(bundle)))
    except Exception as exc:  # genai's own error type: the bundle does not load, which is itself the finding
        return {"passed": False, "runtime": "onnxruntime-genai", "error": f"onnxruntime-genai cannot load the tokenizer: {exc}"}
    samples = _special_samples(reference)
    mismatches, round_trip_failures = [], []
    for text in samples:
        expected = [int(i) for i in reference(text)["input_ids"]]
        got = [int(i) for i in tokenizer.encode(text)]
        if got != expected:
            mismatches.append({"text": text, "hugging_face": expected, "onnxruntime_genai": got})
            continue
        decoded = tokenizer.decode(expected)
        wanted = reference.decode(expected, skip_special_tokens=True)
        if decoded != wanted:
            round_trip_failures.append({"text": text, "hugging_face": wanted, "onnxruntime_genai": decoded})
    check = {
        "runtime": "onnxruntime-genai", "reference": "transformers AutoTokenizer of the source folder",
        "samples": len(samples), "encode_identical": len(samples) - len(mismatches),
        "decode_identical": len(samples) - len(mismatches) - len(round_trip_failures),
        "encode_mismatches": mismatches[:_SHOWN], "decode_mismatches": round_trip_failures[:_SHOWN],
    }
    passed = not mismatches and not round_trip_failures
    expected_chat = _reference_chat(reference)
    if expected_chat is None:
        check["chat_template"] = {"skipped": "the tokenizer has no chat template"}
    else:
        try:
            chat = tokenizer.apply_chat_template(messages=json.dumps(CHAT_MESSAGES), add_generation_prompt=True)
        except Exception as exc:  # genai could not render the template: an app using it gets no prompt
            chat = None
            check["chat_template"] = {"identical": False, "error": f"onnxruntime-genai cannot apply it: {exc}"}
        if chat is not None:
            same_text = chat == expected_chat
            same_ids = [int(i) for i in tokenizer.encode(chat)] == [int(i) for i in reference(expected_chat)["input_ids"]]
            check["chat_template"] = {"identical": same_text, "ids_identical": same_ids}
            if not same_text:
                check["chat_template"].update({"hugging_face": expected_chat, "onnxruntime_genai": chat})
        passed = passed and check["chat_template"].get("identical", False) and check["chat_template"].get("ids_identical", False)
    check["passed"] = passed
    return check


def check_tokenizer_files(bundle: Path, reference) -> dict:
    """The tokenizer files shipped in `bundle`, loaded as apps load them, against the source's tokenizer."""
    if reference is None:
        return {"passed": None, "skipped": "the source has no tokenizer"}
    if not (bundle / "tokenizer.json").is_file():
        return {"passed": False, "error": "the bundle ships no tokenizer.json although its source has a tokenizer"}
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    try:
        raw = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        shipped = AutoTokenizer.from_pretrained(str(bundle), local_files_only=True)
    except Exception as exc:  # a file an app cannot load is the finding
        return {"passed": False, "error": f"the shipped tokenizer files do not load: {exc}"}
    samples = _special_samples(reference)
    mismatches = []
    for text in samples:
        expected = [int(i) for i in reference(text)["input_ids"]]
        by_tokenizers = list(raw.encode(text).ids)
        by_transformers = [int(i) for i in shipped(text)["input_ids"]]
        # transformers' decode (its clean-up of spaces included) of the shipped folder against the source's.
        decoded = shipped.decode(expected, skip_special_tokens=True)
        if by_tokenizers != expected or by_transformers != expected or decoded != reference.decode(expected, skip_special_tokens=True):
            mismatches.append({"text": text, "source": expected, "tokenizers": by_tokenizers, "transformers": by_transformers})
    check = {"runtime": "tokenizers / transformers (what the Swift and Kotlin tokenizers mirror)",
             "reference": "transformers AutoTokenizer of the source folder", "samples": len(samples),
             "identical": len(samples) - len(mismatches), "mismatches": mismatches[:_SHOWN]}
    expected_chat = _reference_chat(reference)
    if expected_chat is None:
        check["chat_template"] = {"skipped": "the tokenizer has no chat template"}
        chat_ok = True
    else:
        chat = _reference_chat(shipped) if getattr(shipped, "chat_template", None) else None
        chat_ok = chat == expected_chat
        check["chat_template"] = {"identical": chat_ok} | ({} if chat_ok else {"source": expected_chat, "shipped": chat})
    check["passed"] = not mismatches and chat_ok
    return check
