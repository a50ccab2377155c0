"""The engines' tokenizer and chat template, loaded without torch, so the router computes their token ids.

The router tokenizes for itself (as llm-d's precise prefix scorer does) rather than asking an engine: no
extra round trip on the request path, nothing to ask while engines start or fail, and token ids are all a
block name needs. The tokenizer is `tokenizers`' own Tokenizer over tokenizer.json, which is what
transformers' fast tokenizers (the engine's) run; the chat template is rendered by transformers'
`render_jinja_template`, the function behind `apply_chat_template`, whose module does not import torch.
Text is encoded with special tokens as the engine encodes completions prompts; a rendered conversation
without (its template supplies them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

# transformers' named special tokens: the variables every chat template may use.
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def resolve_tokenizer_dir(name: str) -> Path:
    """'demo' is the engine's embedded demo model (its directory, or the demo tokenizer built alone, as the
    router's image holds it); anything else a directory."""
    if name == "demo":
        from kvpilot.engine.demo import cache_dir, tokenizer_cache_dir

        for path in (cache_dir(), tokenizer_cache_dir()):
            if (path / "tokenizer.json").is_file():
                return path
        raise FileNotFoundError(f"the demo tokenizer is not built yet ({tokenizer_cache_dir()}): run "
                                "`kvpilot demo-model --tokenizer-only` once")
    path = Path(name).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {name!r}")
    return path


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


class PromptTokenizer:
    def __init__(self, path: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.chat_template = _chat_template(path, config)
        self._special = {k: t for k in _SPECIAL if (t := _token_text(config.get(k))) is not None}

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int] | None:
        """Token ids of the templated conversation; None without a template or when the template refuses it
        (the engine will answer that request with its own 400)."""
        if self.chat_template is None:
            return None
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                                add_generation_prompt=add_generation_prompt, **self._special)
        except Exception:  # jinja raise_exception and friends: the request is the client's problem
            return None
        return list(self._tokenizer.encode(rendered[0], add_special_tokens=False).ids)
