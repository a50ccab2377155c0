"""Routing keys: the router's token ids are the engine's (tokenizer and chat template), without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kvpilot.engine.block_hash import prefix_block_hashes
from kvpilot.engine.demo import ensure_demo_model
from kvpilot.router.keys import route_key
from kvpilot.router.tokenizer import PromptTokenizer, resolve_tokenizer_dir

TEXT = "The scheduler batches requests continuously, splits long prompts into chunks, and shares cached prefixes."
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": TEXT},
                {"role": "assistant", "content": "Yes."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


@pytest.fixture(scope="module")
def tokenizer() -> PromptTokenizer:
    ensure_demo_model()
    return PromptTokenizer(resolve_tokenizer_dir("demo"))


def test_text_and_chat_token_ids_match_the_engine(tokenizer: PromptTokenizer) -> None:
    from transformers import AutoTokenizer

    engine = AutoTokenizer.from_pretrained(ensure_demo_model())
    assert route_key("/v1/completions", {"prompt": TEXT}, tokenizer).token_ids == engine(TEXT).input_ids
    for add_generation_prompt in (True, False):
        body = {"messages": CONVERSATION, "add_generation_prompt": add_generation_prompt}
        messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "Hi"}
                    for m in CONVERSATION]
        rendered = engine.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        expected = engine(rendered, add_special_tokens=False).input_ids
        assert route_key("/v1/chat/completions", body, tokenizer).token_ids == expected


def test_the_demo_tokenizer_built_alone_gives_the_demo_models_token_ids(tmp_path, monkeypatch,
                                                                       tokenizer: PromptTokenizer) -> None:
    """The router's image builds the demo tokenizer without the model (no torch): the same ids."""
    from kvpilot.engine.demo import ensure_demo_tokenizer

    monkeypatch.setenv("KVPILOT_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--tokenizer-only"):
        resolve_tokenizer_dir("demo")
    built = ensure_demo_tokenizer()
    assert resolve_tokenizer_dir("demo") == built and not (built / "config.json").exists()
    alone = PromptTokenizer(built)
    assert alone.encode(TEXT) == tokenizer.encode(TEXT)
    assert alone.encode_chat(CONVERSATION[:3], True) == tokenizer.encode_chat(CONVERSATION[:3], True)


def test_token_id_prompts_and_batches_need_no_tokenizer() -> None:
    ids = list(range(3, 60))
    key = route_key("/v1/completions", {"prompt": ids}, None)
    assert key.token_ids == ids
    assert key.block_hashes(16) == prefix_block_hashes(ids, 16)[:3], "full blocks before the last token"
    assert route_key("/v1/completions", {"prompt": [ids, [1, 2]]}, None).token_ids == ids
    assert route_key("/v1/completions", {"prompt": ["a", "b"]}, None).text == "a"


def test_text_without_tokenizer_keys_by_leading_characters() -> None:
    a = route_key("/v1/completions", {"prompt": "x" * 300 + "one"}, None)
    b = route_key("/v1/completions", {"prompt": "x" * 300 + "two"}, None)
    assert a.token_ids is None and a.block_hashes(16) == []
    assert a.hash_key(16, 4, 256) == b.hash_key(16, 4, 256) is not None
    assert a.hash_key(16, 4, 256) != route_key("/v1/completions", {"prompt": "y" * 300}, None).hash_key(16, 4, 256)
    chat = route_key("/v1/chat/completions", {"messages": CONVERSATION}, None)
    assert chat.text is not None and chat.text.startswith("<system>You are terse.")


def test_hash_key_is_the_leading_blocks_name() -> None:
    ids = list(range(100))
    key = route_key("/v1/completions", {"prompt": ids}, None)
    assert key.hash_key(16, 4, 256) == prefix_block_hashes(ids, 16)[3]
    assert key.hash_key(16, 8, 256) == prefix_block_hashes(ids, 16)[5], "fewer blocks than asked: all it has"
    assert route_key("/v1/completions", {"prompt": [1, 2]}, None).hash_key(16, 4, 256) is None


@pytest.mark.parametrize("body", [None, [], "text", {"prompt": 5}, {"prompt": []}, {"messages": "no"},
                                  {"messages": [{"role": "alien", "content": "x"}]}, {"prompt": [-1] * 40},
                                  {"prompt": [1] * 20 + ["x"] * 20}])
def test_bodies_the_router_cannot_read_get_no_key(body: object) -> None:
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    key = route_key(path, body, None)
    assert key.block_hashes(16) == []


def test_a_template_that_refuses_gives_no_token_ids() -> None:
    tokenizer = PromptTokenizer(resolve_tokenizer_dir("demo"))
    tokenizer.chat_template = "{{ raise_exception('no system role') }}"
    assert tokenizer.encode_chat([{"role": "system", "content": "x"}], True) is None
    tokenizer.chat_template = None
    assert tokenizer.encode_chat([{"role": "user", "content": "x"}], True) is None


def test_the_router_never_imports_torch() -> None:
    ensure_demo_model()
    code = ("import sys\n"
            "from kvpilot.router.app import build_app\n"
            "from kvpilot.router.kube_source import KubernetesSource\n"
            "from kvpilot.router.tokenizer import PromptTokenizer, resolve_tokenizer_dir\n"
            "t = PromptTokenizer(resolve_tokenizer_dir('demo'))\n"
            "assert t.encode_chat([{'role': 'user', 'content': 'hi'}], True)\n"
            "print('torch' in sys.modules, 'transformers.modeling_utils' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]
