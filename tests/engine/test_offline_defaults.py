"""The offline LLM's own limits on a GPU (vLLM's LLM takes the same), and that nothing else moves."""

from __future__ import annotations

from kvpilot.engine import LLM, EngineConfig
from kvpilot.engine.llm import OFFLINE_GPU_DEFAULTS, offline_config


def test_a_gpu_takes_the_offline_limits_unless_the_user_set_them() -> None:
    on_gpu = offline_config("demo", {}, on_gpu=True)
    assert (on_gpu.max_num_seqs, on_gpu.max_num_batched_tokens) == (1024, 16384)
    assert OFFLINE_GPU_DEFAULTS == {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}
    mine = offline_config("demo", {"max_num_seqs": 8, "max_num_batched_tokens": 64}, on_gpu=True)
    assert (mine.max_num_seqs, mine.max_num_batched_tokens) == (8, 64)
    partial = offline_config("demo", {"max_num_batched_tokens": 512}, on_gpu=True)
    assert (partial.max_num_seqs, partial.max_num_batched_tokens) == (1024, 512)


def test_the_server_and_the_cpu_keep_engine_config_defaults(tiny_model) -> None:
    serving = EngineConfig(model="demo")
    assert (serving.max_num_seqs, serving.max_num_batched_tokens) == (256, 8192)
    assert offline_config("demo", {}, on_gpu=False) == serving
    llm = LLM(str(tiny_model("llama")), device="cpu")
    assert (llm.config.max_num_seqs, llm.config.max_num_batched_tokens) == (256, 8192)
