"""Quality of a quantized model against its fp32 reference, teacher-forced on the same text.

Decoders: both models read the same token windows; for every scored position we compare the
next-token distributions: perplexity of each model on the real next token, top-1 agreement, and
KL(fp32 || quantized) (mean and p99), the figures llama.cpp's `llama-perplexity --kl-divergence`
reports. Encoders: cosine similarity of per-token embeddings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.core.metrics import (
    cosine_per_position,
    kl_per_position,
    kl_summary,
    log_softmax,
    max_abs_diff,
    perplexity,
    token_nll,
    top1_agreement,
    top1_figures,
)
from edgepack.core.texts import eval_text
from edgepack.core.windows import split_windows, token_ids, vocab_size_of
from edgepack.errors import BadInputError
from edgepack.runtime.model_dir import TEXT_GENERATION

_ROWS = 64  # positions compared at a time
SENTENCE_BATCH = 8  # sentences embedded per call: padding and masks are part of what is checked
MAX_SENTENCES = 128


def sentence_token_ids(tokenizer, text: str, max_length: int) -> list[list[int]]:
    """The evaluation text as sentences of at least 4 words, each tokenized as the app would (special tokens
    included), at most MAX_SENTENCES."""
    import re

    sentences = [" ".join(part.split()) for part in re.split(r"(?<=[.!?])\s+", text)]
    sentences = [sentence for sentence in sentences if len(sentence.split()) >= 4][:MAX_SENTENCES]
    return [list(tokenizer(sentence, truncation=True, max_length=max_length)["input_ids"]) for sentence in sentences]


def _is_float_graph(onnx_path: Path) -> bool:
    """An export `edgepack quantize` did not write (it leaves quantize.json beside the graph). Quantized
    kernels compute differently without their prepacked weights, so those graphs run as deployed."""
    return not (Path(onnx_path).parent / "quantize.json").is_file()


@dataclass(frozen=True)
class QualityConfig:
    eval_text: Path | None = None
    eval_tokens: int = 512  # scored positions, at least
    context: int = 512  # window length (capped by the model's max positions)
    threads: int | None = None


class QualityEvaluator:
    """Holds the fp32 reference's outputs so several candidates (e.g. for `auto`) are compared cheaply."""

    def __init__(self, reference_onnx: Path, model_dir, tokenizer, config: QualityConfig = QualityConfig()):
        self.config = config
        self.model_dir = model_dir
        text, self.origin = eval_text(config.eval_text)
        self.text_sha256 = hashlib.sha256(text.encode()).hexdigest()
        ids = token_ids(tokenizer, text, vocab_size=vocab_size_of(model_dir.config)) if tokenizer is not None else []
        max_pos = int(model_dir.config.get("max_position_embeddings") or model_dir.config.get("n_positions") or config.context)
        self.context = max(8, min(config.context, max_pos))
        self.windows: list[list[int]] = []
        scored = 0
        for window in split_windows(ids, self.context, min_length=8):
            if scored >= config.eval_tokens:
                break
            self.windows.append(window)
            scored += len(window) - 1
        if scored < config.eval_tokens:
            raise BadInputError(
                f"evaluation text {self.origin} gives {scored} scored token positions; at least {config.eval_tokens} "
                "are needed (pass a longer --eval-text or a smaller --eval-tokens)"
            )
        self.task = model_dir.task
        prepack = not _is_float_graph(reference_onnx)
        self.sentences: list[list[int]] = []
        self.sentence_reference = None
        if self.task == TEXT_GENERATION:
            self.reference = list(self._outputs(reference_onnx, prepack=prepack))
        else:
            if tokenizer is not None:
                self.sentences = sentence_token_ids(tokenizer, text, max_length=self.context)
            self.reference, self.sentence_reference = self._encoder_outputs(reference_onnx, prepack=prepack)

    def _outputs(self, onnx_path: Path, prepack: bool = True):
        """Decoder logits for each window in turn, one session per model.

        A generator: a candidate's outputs are compared window by window and never all held; the session
        is freed when the last window has been read. A float reference runs without prepacked weights
        (one copy of the weights instead of two; outputs within float rounding of the packed kernels').
        """
        from edgepack.runtime.generate import DecoderSession
        from edgepack.runtime.session import create_session

        session = create_session(onnx_path, threads=self.config.threads, prepack=prepack, arena=False)
        decoder = DecoderSession(session, self.model_dir.config)
        for window in self.windows:
            yield decoder.forward(window, decoder.empty_cache(), 0)[0]

    def _encoder_outputs(self, onnx_path: Path, prepack: bool = True):
        """(hidden states of each window, the graph's `sentence_embedding` of every evaluation sentence in padded
        batches of SENTENCE_BATCH as apps embed them, or None without a sentence output), from one session."""
        from edgepack.convert.pooling import sentence_output
        from edgepack.runtime.generate import encoder_batch_feeds, encoder_feeds
        from edgepack.runtime.session import create_session

        session = create_session(onnx_path, threads=self.config.threads, prepack=prepack, arena=False)
        names = {i.name for i in session.get_inputs()}
        hidden = [session.run(None, encoder_feeds(window, names))[0][0] for window in self.windows]
        name = sentence_output(session)
        if name is None or not self.sentences:
            return hidden, None
        batches = [self.sentences[i:i + SENTENCE_BATCH] for i in range(0, len(self.sentences), SENTENCE_BATCH)]
        return hidden, np.concatenate([session.run([name], encoder_batch_feeds(batch, names))[0] for batch in batches])

    def evaluate(self, candidate_onnx: Path) -> dict:
        if self.task != TEXT_GENERATION:
            hidden, got = self._encoder_outputs(candidate_onnx)
            figures = self._encoder_figures(hidden)
            if self.sentence_reference is not None and got is not None:
                cos = cosine_per_position(self.sentence_reference.astype(np.float64), got.astype(np.float64))
                figures.update(sentences=int(cos.size), sentence_cosine_min=float(cos.min()), sentence_cosine_mean=float(cos.mean()))
                figures["method"] += f"; sentence embeddings ({SENTENCE_BATCH} sentences a batch, padded) by cosine"
            return figures
        kls, agree, nll_ref, nll_q, top2 = [], [], [], [], []
        max_abs = 0.0
        for window, ref, cand in zip(self.windows, self.reference, self._outputs(candidate_onnx)):
            # Row slices of the window: every figure is per position, so the slices give the same values as
            # the whole window while the float64 copies stay a few MB (a window's float64 log-probabilities
            # are positions x vocabulary x 8 bytes: hundreds of MB at a 150k vocabulary).
            for start in range(0, len(window), _ROWS):
                stop = min(start + _ROWS, len(window))
                r, c = ref[start:stop], cand[start:stop]
                max_abs = max(max_abs, max_abs_diff(r.astype(np.float64), c))
                scored = min(stop, len(window) - 1) - start  # the last position has no next token
                if scored <= 0:
                    continue
                lp_ref, lp_q = log_softmax(r[:scored]), log_softmax(c[:scored])
                targets = window[start + 1:start + 1 + scored]
                nll_ref.append(token_nll(lp_ref, targets))
                nll_q.append(token_nll(lp_q, targets))
                kls.append(kl_per_position(lp_ref, lp_q))
                agree.append(top1_agreement(r[:scored], c[:scored]))
                top2.append(np.partition(lp_ref, -2, axis=-1)[:, -2:])  # all top1_figures reads of the reference
                del lp_ref, lp_q
            del cand
        kl = np.concatenate(kls)
        ppl_ref, ppl = perplexity(np.concatenate(nll_ref)), perplexity(np.concatenate(nll_q))
        return {
            "method": "teacher-forced next-token distributions on the same windows; KL(fp32 || quantized) per position",
            "eval_text": self.origin,
            "eval_text_sha256": self.text_sha256,
            "positions": int(kl.size),
            "windows": len(self.windows),
            "context": self.context,
            "ppl_reference": ppl_ref,
            "ppl": ppl,
            "ppl_ratio": ppl / ppl_ref,
            **top1_figures(np.concatenate(top2), np.concatenate(agree)),
            **kl_summary(kl),
            "max_abs_logit_diff": max_abs,
        }

    def _encoder_figures(self, candidate) -> dict:
        cos = np.concatenate([cosine_per_position(ref, cand) for ref, cand in zip(self.reference, candidate)])
        return {
            "method": "cosine similarity of per-token embeddings on the same windows",
            "eval_text": self.origin,
            "eval_text_sha256": self.text_sha256,
            "positions": int(cos.size),
            "windows": len(self.windows),
            "context": self.context,
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "sentences": None,  # set with the sentence figures when the export has a sentence_embedding output
            "sentence_cosine_min": None,
            "sentence_cosine_mean": None,
            "ppl_reference": None,
            "ppl": None,
            "ppl_ratio": None,
            "top1_agreement": None,
            "top1_ci95": None,
            "near_tie_positions": None,
            "top1_agreement_decisive": None,
            "kl_mean": None,
            "kl_p99": None,
            "kl_max": None,
        }
