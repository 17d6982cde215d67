"""Tiny random transformers (seconds to export) with a small trained BPE tokenizer and a chat template."""

from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "What is the capital of France? Write a haiku about the sea.",
    "Quantization trades a little quality for a lot of memory bandwidth on phones.",
] * 20


def _config(arch: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=2, pad_token_id=3)
    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    common.update({k: v for k, v in overrides.items() if k in common})
    decoder.update({k: v for k, v in overrides.items() if k not in common})
    if arch == "llama":
        return tf.LlamaConfig(**common, **{"num_key_value_heads": 2, "tie_word_embeddings": False, **decoder})
    if arch == "llama-tied":  # one table for embedding and lm_head, like SmolLM2 (not in ARCHITECTURES)
        return tf.LlamaConfig(**common, **{"num_key_value_heads": 2, "tie_word_embeddings": True, **decoder})
    if arch == "qwen2":
        return tf.Qwen2Config(**common, **{"num_key_value_heads": 1, "use_sliding_window": False, **decoder})
    if arch == "qwen3":
        return tf.Qwen3Config(**common, **{"num_key_value_heads": 2, "head_dim": 16, "use_sliding_window": False, **decoder})
    if arch == "granite":  # multipliers away from 1 so that a target dropping one of them fails parity
        return tf.GraniteConfig(**common, **{"num_key_value_heads": 2, "embedding_multiplier": 4.0, "residual_multiplier": 0.5,
                                             "attention_multiplier": 0.0625, "logits_scaling": 2.0, **decoder})
    if arch == "mistral":
        return tf.MistralConfig(**common, **{"num_key_value_heads": 2, "sliding_window": None, **decoder})
    if arch == "phi3":
        return tf.Phi3Config(**common, **{"num_key_value_heads": 4, "original_max_position_embeddings": 256, **decoder})
    if arch == "gemma":
        return tf.GemmaConfig(**common, **{"num_key_value_heads": 1, "head_dim": 16, **decoder})
    if arch == "gemma2":  # query_pre_attn_scalar != head_dim and caps low enough to bite on random weights
        return tf.Gemma2Config(**common, **{"num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 32,
                                            "attn_logit_softcapping": 5.0, "final_logit_softcapping": 15.0, "sliding_window": 128, **decoder})
    if arch == "gpt2":
        return tf.GPT2Config(**{"vocab_size": VOCAB_SIZE, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256,
                                "bos_token_id": 0, "eos_token_id": 2, **overrides})
    if arch == "bert":
        return tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=256, pad_token_id=3)
    raise ValueError(f"no tiny config for {arch}")


ARCHITECTURES = ("llama", "qwen2", "mistral", "phi3", "gemma", "gpt2", "bert")
DECODERS = tuple(a for a in ARCHITECTURES if a != "bert")


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="[PAD]", unk_token="[UNK]"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def build(arch: str, out: Path, *, safe_serialization: bool = True, seed: int = 0, **config_overrides) -> Path:
    """A tiny random `arch` model in `out`; `config_overrides` set config attributes (e.g. bos_token_id=None)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(arch, **config_overrides)
    torch.manual_seed(seed)
    model_cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = model_cls.from_config(config).eval()
    if arch != "bert":
        # Random init gives near-flat logits; widen them so greedy decoding has clear winners, as real models do.
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
            if arch == "gemma2":  # attention logits large enough for attn_logit_softcapping to change the output
                for layer in model.model.layers:
                    layer.self_attn.q_proj.weight.mul_(8.0)
                    layer.self_attn.k_proj.weight.mul_(8.0)
    model.save_pretrained(str(out), safe_serialization=safe_serialization)
    build_tokenizer(out)
    return out
