"""Tiny checkpoints for tests: TINY (the embedded simple_moe), one random checkpoint per causal
architecture, and a causal checkpoint with a tokenizer.json (a byte-level BPE trained here, no downloads)."""

from __future__ import annotations

from pathlib import Path

from moe_serve.model.synthetic import SyntheticConfig

TINY = SyntheticConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_experts=8,
                       num_experts_per_tok=2, seed=1234)

SENTENCES = [
    "The cat sat on the mat.", "A dog ran after the cat in the garden.", "Experts run on many machines.",
    "The gateway routes every token to its experts.", "Café, naïve, déjà vu: words with accents.",
    "日本語のテキストも少し。", "Mixture of experts models are sparse.",
]
VOCAB = 300  # 256 byte symbols, a few merges and specials


def write_causal_checkpoints(root: Path, seed: int) -> dict[str, Path]:
    """One tiny random checkpoint per causal architecture: the four transformers ones and deepseek.

    qwen2_moe is written sharded (model.safetensors.index.json), olmoe and deepseek with hub-style configs;
    architecture i gets seed + i, and the seed is in each directory's name.
    """
    from tests.support.deepseek_ref import write_checkpoint as write_deepseek
    from tests.support.hf_models import ARCHS, build_checkpoint

    paths = {arch: build_checkpoint(arch, root / f"{arch}-{seed}", seed + i, sharded=arch == "qwen2_moe",
                                    hub_style=arch == "olmoe")
             for i, arch in enumerate(ARCHS)}
    paths["deepseek"] = write_deepseek(root / f"deepseek-{seed}", seed + len(ARCHS))
    return paths


def build_tokenizer():
    """Byte-level BPE, so random token streams can split multi-byte characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return tokenizer


def write_text_checkpoint(path: Path, seed: int) -> Path:
    """A qwen3_moe checkpoint whose vocabulary matches the tokenizer, with tokenizer.json beside it."""
    from tests.support.hf_models import build_checkpoint

    tokenizer = build_tokenizer()
    build_checkpoint("qwen3_moe", path, seed, vocab_size=tokenizer.get_vocab_size())
    tokenizer.save(str(path / "tokenizer.json"))
    return path
