"""The embedded demo model: a tiny Llama with random weights and a locally trained byte-level BPE tokenizer.

Built once into a cache directory with the real `save_pretrained` formats (config.json, safetensors,
tokenizer.json with a chat template), so every command works offline, with no GPU, through the same
loading code a real checkpoint takes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_VERSION = "2"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Ordinary added tokens, as in Qwen's tokenizer: one token each, and kept in decoded text.
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
# ChatML, with tools in the Hermes/Qwen 2.5 style: the functions listed in the system turn, calls in
# <tool_call> tags (arguments rendered as the JSON object they are), results in <tool_response> tags.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\n' + message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{{- call['arguments'] | tojson }}{{- '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# A few lines of text the tokenizer learns its merges from; content matters little, determinism a lot.
_CORPUS = """\
kvpilot runs large language models on Kubernetes and tunes the engine against latency targets.
The scheduler batches requests continuously, splits long prompts into chunks, and shares cached prefixes.
Each sequence owns a table of blocks in the paged key value cache; blocks are counted and freed exactly once.
When memory runs out the newest sequence is preempted and recomputed later, with the same output.
The operator deploys a candidate revision, verifies it, and switches traffic only when it serves well.
Time to first token and inter token latency are measured at the edges and exported to Prometheus.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
def generate(prompt, max_tokens=16): return engine.step() while not finished
{"role": "user", "content": "What is the capital of France?"} The answer is Paris.
0 1 2 3 4 5 6 7 8 9 10 100 1000 2048 4096 8192 tokens per second, milliseconds, p95, p99.
"""


def _cache_root() -> Path:
    return Path(os.environ.get("KVPILOT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvpilot"
    ))


def cache_dir() -> Path:
    return _cache_root() / f"demo-model-v{DEMO_VERSION}"


def tokenizer_cache_dir() -> Path:
    """The demo tokenizer alone, for what tokenizes without running the model (the router's image, no torch)."""
    return _cache_root() / f"demo-tokenizer-v{DEMO_VERSION}"


def _build_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TOOL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _build_model(out: Path, vocab_size: int, eos_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        initializer_range=0.2,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def _build_model_dir(out: Path) -> None:
    _build_tokenizer(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    _build_model(out, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)


def _ensure(target: Path, marker: str, build: Callable[[Path], None], what: str) -> Path:
    """`target`, built atomically on first use: in a temporary sibling, then renamed."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the %s into %s (once)", what, target)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_demo_model() -> Path:
    """Return the demo model directory, building it atomically on first use."""
    return _ensure(cache_dir(), "config.json", _build_model_dir, "demo model")


def ensure_demo_tokenizer() -> Path:
    """The demo tokenizer without the model (no torch needed): the same training, so the same token ids."""
    return _ensure(tokenizer_cache_dir(), "tokenizer.json", _build_tokenizer, "demo tokenizer")


def resolve_model_path(model: str) -> Path:
    """'demo' means the embedded model; anything else must be an existing directory."""
    if model == "demo":
        return ensure_demo_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model path {model!r} does not exist or is not a directory")
    return path
