"""A checkpoint's chat template, rendered as transformers' apply_chat_template renders it.

The template comes from chat_template.jinja (transformers 5's file) or tokenizer_config.json's
`chat_template` (a string, or a list of named templates: "default" is used). The environment is
transformers': a sandboxed, immutable jinja2 with trim_blocks and lstrip_blocks, loop controls, a
`tojson` that keeps non-ASCII text, and `raise_exception` / `strftime_now`; the special tokens of
tokenizer_config.json (bos_token, eos_token, ...) are template variables. The rendered text is then
encoded without adding special tokens (the template writes its own), as transformers does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the messages (raise_exception) or failed to render them."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _special_token(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict ({"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


class ChatTemplate:
    """One compiled template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> ChatTemplate | None:
        """The checkpoint's template, or None when it has none."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            source = jinja_file.read_text()
        if not source:
            return None
        return cls(source, {key: _special_token(config.get(key)) for key in _SPECIAL_KEYS})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation; ChatTemplateError when the template refuses it."""
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(str(err)) from err
