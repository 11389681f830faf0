"""Text <-> token ids for checkpoints that ship a tokenizer.json, and streamed detokenisation."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

# Tokens decoded again together with each new one, so word pieces and spaces join as they would in a full decode.
_CONTEXT = 5


class TextTokenizer:
    """A checkpoint's tokenizer.json (HF `tokenizers` format)."""

    def __init__(self, tokenizer: Tokenizer, path: Path):
        self.tokenizer = tokenizer
        self.path = path

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> TextTokenizer | None:
        """The checkpoint's tokenizer.json, or None when it has none."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            return cls(Tokenizer.from_file(str(path)), path)
        except Exception as err:  # the Rust side raises plain Exception for any malformed file
            from moe_serve.model.checkpoint import (
                CheckpointError,  # here: the reader loads torch, the HTTP front end not
            )

            raise CheckpointError(f"{path}: not a valid tokenizer.json ({err})") from err

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the special tokens (e.g. BOS) the tokenizer's post-processor adds unless
        add_special_tokens is False (a rendered chat template holds its own, as transformers encodes it)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self, prompt_ids: list[int]) -> TextStream:
        """A detokeniser for the tokens generated after `prompt_ids`."""
        return TextStream(self, prompt_ids)


class TextStream:
    """Turns generated tokens into text pieces as they arrive; the pieces add up to the decoded text.

    A token that ends inside a multi-byte character yields "" until the character completes; the last
    token yields whatever is still held back (with U+FFFD for bytes no character completes).
    """

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.prefix = max(len(self.ids) - _CONTEXT, 0)  # where the decoded window starts
        self.read = len(self.ids)  # tokens before this are already turned into text

    def push(self, token: int, last: bool = False) -> str:
        """The new text that `token` completes; with `last`, all text not yet returned."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if last or (len(after) > len(before) and not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""
