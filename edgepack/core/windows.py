"""Token windows of a text, for calibration and evaluation, defined once.

`token_ids` tokenizes; `split_windows` cuts a token list into windows (consecutive, strided, spread
evenly over the text, or cycling through it); `token_windows` is the strict form the static NPU graphs
need: exactly `count` full windows of running text, or a one-line error.
"""

from __future__ import annotations

from edgepack.errors import BadInputError


def token_ids(tokenizer, text: str, *, special_tokens: bool = True, vocab_size: int | None = None) -> list[int]:
    """The text's token ids; `special_tokens=False` gives running text (no BOS/EOS added).

    With `vocab_size` (the model's embedding rows), an id the model has no row for is bad input: a
    tokenizer from another model would otherwise fail deep inside PyTorch or onnxruntime.
    """
    ids = list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    return check_in_vocab(ids, vocab_size)


def check_in_vocab(ids: list[int], vocab_size: int | None) -> list[int]:
    """`ids`, or BadInputError when one of them has no row in an embedding of `vocab_size` rows."""
    if vocab_size and ids and max(ids) >= vocab_size:
        raise BadInputError(f"the tokenizer gives token id {max(ids)} but the model's vocabulary has {vocab_size} entries "
                            "(config.json vocab_size): tokenizer and model do not match")
    return ids


def vocab_size_of(config: dict) -> int | None:
    """The model's vocabulary size from its config.json (None when it does not say)."""
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(value) if value else None


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


def token_windows(tokenizer, text: str, length: int, count: int, *, what: str, stride: int | None = None,
                  vocab_size: int | None = None) -> list[list[int]]:
    """Exactly `count` full windows of `length` tokens of running text, or BadInputError naming `what`."""
    # Running text without special tokens: a BOS at the start of the first window only would put that window's
    # massive activation (LLMs' attention-sink token, see qnn_support.static_model.StaticDecoder.make_prefix)
    # into the calibration ranges.
    windows = split_windows(token_ids(tokenizer, text, special_tokens=False, vocab_size=vocab_size), length, count=count, stride=stride)
    if len(windows) < count:
        raise BadInputError(f"{what} set too small: the text gives {len(windows)} window(s) of {length} tokens, "
                            f"{count} needed (pass a longer text or fewer samples)")
    return windows
