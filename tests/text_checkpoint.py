"""A causal checkpoint with a tokenizer.json: a byte-level BPE trained here on a few sentences (no downloads)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SENTENCES = [
    "The cat sat on the mat.", "A dog ran after the cat in the garden.", "Experts run on many machines.",
    "The gateway routes every token to its experts.", "Café, naïve, déjà vu: words with accents.",
    "日本語のテキストも少し。", "Mixture of experts models are sparse.",
]
VOCAB = 300  # 256 byte symbols, a few merges and specials


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE, so random token streams can split multi-byte characters."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return tokenizer


def write_text_checkpoint(path: Path, seed: int) -> Path:
    """A qwen3_moe checkpoint whose vocabulary matches the tokenizer, with tokenizer.json beside it."""
    from hf_models import build_checkpoint

    tokenizer = build_tokenizer()
    build_checkpoint("qwen3_moe", path, seed, vocab_size=tokenizer.get_vocab_size())
    tokenizer.save(str(path / "tokenizer.json"))
    return path
