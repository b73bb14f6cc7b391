"""Tiny, randomly initialised Hugging Face models saved locally at test time (no network), with a tokenizer.

Import as ``from tests.hf_models import save_tiny``. A word-level tokenizer (``WORDS``) can be saved
beside a model: Llama and GPT-2 load it as it is; Qwen2 and GPT-NeoX load their own tokenizer class,
which re-reads it, so tests give those two token ids instead of text.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ARCHITECTURES = ("gpt2", "gpt_neox", "qwen2", "llama")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = SPECIALS + ["the", "a", "cat", "dog", "sat", "on", "mat", "some", "text", "hello", "world", "is", "was", "and", "of", "to", "in", "it", "that", "def", "return", "if", "else", "for", "while", "class", "import", "self", "print", "x", "y"]
VOCAB = 64
N_CTX = 32


def _config(architecture: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if architecture == "gpt2":
        return GPT2Config(n_positions=N_CTX, n_embd=32, n_layer=2, n_head=4, **common)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=N_CTX, **common)
    cls = Qwen2Config if architecture == "qwen2" else LlamaConfig  # both with grouped-query attention
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=N_CTX, **common)


def _model_class(architecture: str):
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM

    return {"gpt2": GPT2LMHeadModel, "gpt_neox": GPTNeoXForCausalLM, "qwen2": Qwen2ForCausalLM,
            "llama": LlamaForCausalLM}[architecture]


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over ``WORDS`` (padded with placeholder words to ``VOCAB``), saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [f"w{i}" for i in range(VOCAB - len(WORDS))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def save_tiny(architecture: str, folder: Path, seed: int = 0, tokenizer: bool = False) -> Path:
    """Save a tiny random ``architecture`` model (and the word-level tokenizer) into ``folder``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _model_class(architecture)(_config(architecture)).eval().save_pretrained(folder)
    if tokenizer:
        save_tokenizer(folder)
    return folder


def boot(folder: Path) -> torch.nn.Module:
    """``TransformerBridge.boot_transformers`` on a local folder, offline, without the loading bar."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({key: "1" for key in saved})
    hf_logging.disable_progress_bar()
    try:
        return TransformerBridge.boot_transformers(str(folder), device="cpu").eval()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
