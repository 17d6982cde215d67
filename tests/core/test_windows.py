"""The shared token-window builders: consecutive, strided, spread and cycling windows, and the strict form."""

import pytest

from edgepack.core.windows import split_windows, token_ids, token_windows
from edgepack.errors import BadInputError

IDS = list(range(23))


def test_consecutive_full_windows_by_default():
    assert split_windows(IDS, 5) == [IDS[0:5], IDS[5:10], IDS[10:15], IDS[15:20]]
    assert split_windows(IDS, 5, count=2) == [IDS[0:5], IDS[5:10]]
    assert split_windows(IDS, 30) == []


def test_min_length_keeps_a_short_tail():
    assert split_windows(IDS, 10, min_length=1) == [IDS[0:10], IDS[10:20], IDS[20:23]]
    assert split_windows(IDS, 10, min_length=4) == [IDS[0:10], IDS[10:20]]  # a 3-token tail is too short
    assert split_windows(IDS, 30, min_length=1) == [IDS]


def test_stride_overlaps_windows():
    assert split_windows(IDS, 6, stride=4) == [IDS[s : s + 6] for s in (0, 4, 8, 12, 16)]


def test_spread_spaces_count_windows_over_the_text():
    # (23 - 5) // 3 = 6: starts 0, 6, 12
    assert split_windows(IDS, 5, count=3, spread=True) == [IDS[0:5], IDS[6:11], IDS[12:17]]
    # more windows asked than the text holds at stride 1: as many full ones as fit
    assert len(split_windows(IDS, 20, count=10, spread=True)) == 4
    assert split_windows(IDS, 20, count=10, spread=True, min_length=1)[-1] == IDS[9:23]


def test_cycle_reuses_a_short_text():
    windows = split_windows(IDS, 4, count=8, cycle=True)
    period = len(IDS) - 4
    assert windows == [IDS[(4 * k) % period :][:4] for k in range(8)]
    assert windows[5] == IDS[1:5]  # 20 % 19 wrapped around
    assert split_windows([7, 8], 4, count=3, cycle=True) == [[7, 8]] * 3


@pytest.fixture(scope="module")
def tokenizer():
    """A real fast tokenizer whose special tokens are added around every text (as BERT's and Llama's are)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "the quick brown fox jumps over lazy dog".split()
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


TEXT = "the quick brown fox jumps over the lazy dog " * 3


def test_token_ids_with_and_without_special_tokens(tokenizer):
    running = token_ids(tokenizer, TEXT, special_tokens=False)
    assert len(running) == 27 and 1 not in running and 2 not in running
    assert token_ids(tokenizer, TEXT) == [1, *running, 2]


def test_token_windows_are_running_text_and_refuse_too_little(tokenizer):
    running = token_ids(tokenizer, TEXT, special_tokens=False)
    windows = token_windows(tokenizer, TEXT, 8, 3, what="calibration")
    assert windows == [running[0:8], running[8:16], running[16:24]]
    assert token_windows(tokenizer, TEXT, 8, 5, what="calibration", stride=4)[-1] == running[16:24]
    with pytest.raises(BadInputError, match=r"^evaluation set too small: the text gives 3 window\(s\) of 8 tokens, 4 needed"):
        token_windows(tokenizer, TEXT, 8, 4, what="evaluation")
