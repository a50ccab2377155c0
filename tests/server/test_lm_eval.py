"""lm-evaluation-harness itself (its `local-completions` model) against `kvpilot serve --model demo`: a
multiple-choice task and a generation task from JSONL files shipped in tests/evals/. Its per-choice
log-likelihoods equal the offline engine's prompt logprobs within 1e-4.

lm-eval cannot share the test environment: through pytablewriter it pins python-dateutil < 3, which the
kubernetes client (>= 3) refuses. .ci/run installs it into a venv of its own and names its executable in
KVPILOT_LM_EVAL; without it the test is skipped locally and fails in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.demo import ensure_demo_model

from tests.server.conftest import free_port, wait_ready

EVALS = Path(__file__).parents[1] / "evals"
ENGINE_FLAGS = ["--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "160"]


def _lm_eval() -> str:
    exe = os.environ.get("KVPILOT_LM_EVAL") or shutil.which("lm_eval")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("lm-eval is not installed: .ci/run installs it and sets KVPILOT_LM_EVAL")
        pytest.skip("lm-eval is not installed (see .ci/run): set KVPILOT_LM_EVAL to its lm_eval executable")
    return exe


@pytest.fixture(scope="module")
def served_demo():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvpilot", "serve", "--model", "demo", "--port", str(port),
                             "--host", "127.0.0.1", *ENGINE_FLAGS], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, lambda: proc.poll() is None, 120)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def test_lm_eval_runs_and_its_loglikelihoods_equal_the_engines(served_demo: str, tmp_path: Path) -> None:
    exe = _lm_eval()
    model_dir = ensure_demo_model()
    args = (f"model=demo,base_url={served_demo}/v1/completions,tokenizer={model_dir},"
            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([exe, "--model", "local-completions", "--model_args", args,
                          "--tasks", "kvpilot_mc,kvpilot_gen", "--include_path", str(EVALS),
                          "--output_path", str(tmp_path), "--log_samples"],
                         cwd=EVALS, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (results,) = tmp_path.glob("demo/results_*.json")
    summary = json.loads(results.read_text())["results"]
    assert "acc,none" in summary["kvpilot_mc"] and "exact_match,none" in summary["kvpilot_gen"]
    (samples,) = tmp_path.glob("demo/samples_kvpilot_mc_*.jsonl")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM("demo", device="cpu", max_model_len=256, num_kv_blocks=160)
    compared = 0
    for line in samples.read_text().splitlines():
        doc = json.loads(line)
        for (resp,), args_ in zip(doc["resps"], doc["arguments"].values(), strict=True):
            context, continuation = args_["arg_0"], args_["arg_1"]
            # lm-eval's _encode_pair: encode the whole, the continuation is what follows the context's tokens
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            ctx_len = len(tokenizer(context, add_special_tokens=False).input_ids)
            lps = llm.generate([whole], SamplingParams(max_tokens=0, prompt_logprobs=0))[0].prompt_logprobs
            expected = sum(lp.logprob for lp in lps[ctx_len:])
            assert abs(float(resp[0]) - expected) < 1e-4, (context, continuation, resp, expected)
            compared += 1
    assert compared == 14
