"""Calibration data: real text, tokenized, fed through the fp32 decoder including its KV-cache inputs.

Each sample is a prefill feed (empty cache) followed by decode feeds whose past key/values are the
fp32 model's real cache for that text, so static quantization sees the activation ranges of both
phases of generation, not just of a cache-less forward pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepack.core.windows import split_windows
from edgepack.errors import BadInputError


class DecoderCalibrationReader:
    """onnxruntime CalibrationDataReader over (prefill, decode...) feeds of real text."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._iter = iter(self.feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)

    def __iter__(self):  # GPTQ's dataloader iterates the reader
        return iter(self.feeds)

    def __deepcopy__(self, memo):
        return DecoderCalibrationReader(self.feeds)


def decoder_calibration_feeds(onnx_path: Path, token_ids: list[int], config: dict, *, samples: int,
                              prefill_len: int = 48, decode_steps: int = 2) -> list[dict[str, np.ndarray]]:
    from edgepack.runtime.generate import DecoderSession
    from edgepack.runtime.session import create_session

    if len(token_ids) < prefill_len + decode_steps + 1:
        raise BadInputError(f"calibration text is too short: {len(token_ids)} tokens, need at least {prefill_len + decode_steps + 1}")
    decoder = DecoderSession(create_session(onnx_path), config)
    feeds = []
    for window in split_windows(token_ids, prefill_len + decode_steps, count=samples, spread=True):
        cache, past = decoder.empty_cache(), 0
        chunks = [window[:prefill_len]] + [[t] for t in window[prefill_len:]]
        for chunk in chunks:
            feed = decoder.make_feeds(chunk, cache, past)
            feeds.append(feed)
            _, cache = decoder.forward(chunk, cache, past)
            past += len(chunk)
    return feeds


def encoder_calibration_feeds(input_names: set[str], token_ids: list[int], *, samples: int, length: int = 64):
    from edgepack.runtime.generate import encoder_feeds

    return [encoder_feeds(window, input_names) for window in split_windows(token_ids, length, count=samples, spread=True, min_length=1)]
