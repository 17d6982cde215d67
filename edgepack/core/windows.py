"""Token windows of a text, for calibration and evaluation, defined once.

`token_ids` tokenizes; `split_windows` cuts a token list into windows (consecutive, strided, spread
evenly over the text, or cycling through it); `token_windows` is the strict form the static NPU graphs
need: exactly `count` full windows of running text, or a one-line error.
"""

from __future__ import annotations

from edgepack.errors import BadInputError


def token_ids(tokenizer, text: str, *, special_tokens: bool = True) -> list[int]:
    """The text's token ids; `special_tokens=False` gives running text (no BOS/EOS added)."""
    if special_tokens:
        return list(tokenizer(text)["input_ids"])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_windows(ids: list[int], length: int, *, count: int | None = None, stride: int | None = None,
                  spread: bool = False, min_length: int | None = None, cycle: bool = False) -> list[list[int]]:
    """Windows `ids[start : start + length]` at start = 0, stride, 2 * stride, ...

    stride: default `length` (consecutive windows); `spread=True` spaces `count` windows evenly over the
    text instead. Windows end at the first one shorter than `min_length` (default `length`: full
    windows only) and after `count` of them. `cycle=True` takes exactly `count` windows, the starts
    wrapping around modulo `len(ids) - length` (so a short text is reused rather than running out).
    """
    if spread:
        stride = max(1, (len(ids) - length) // max(1, count or 0))
    stride = stride or length
    if cycle:
        period = max(len(ids) - length, 1)
        return [ids[(k * stride) % period :][:length] for k in range(count or 0)]
    min_length = length if min_length is None else min_length
    windows = []
    for start in range(0, len(ids), stride):
        window = ids[start : start + length]
        if len(window) < min_length or (count is not None and len(windows) >= count):
            break
        windows.append(window)
    return windows


def token_windows(tokenizer, text: str, length: int, count: int, *, what: str, stride: int | None = None) -> list[list[int]]:
    """Exactly `count` full windows of `length` tokens of running text, or BadInputError naming `what`."""
    # Running text without special tokens: a BOS at the start of the first window only would put that window's
    # massive activation (LLMs' attention-sink token, see qnn_support.static_model.StaticDecoder.make_prefix)
    # into the calibration ranges.
    windows = split_windows(token_ids(tokenizer, text, special_tokens=False), length, count=count, stride=stride)
    if len(windows) < count:
        raise BadInputError(f"{what} set too small: the text gives {len(windows)} window(s) of {length} tokens, "
                            f"{count} needed (pass a longer text or fewer samples)")
    return windows
