"""The real `openai` client, sync and async, streaming and not, completions and chat."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import RunningServer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is kvpilot?"}]


def sync_client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_completion_sync(server: RunningServer) -> None:
    client = sync_client(server)
    out = client.completions.create(model="demo", prompt="The scheduler", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == "demo"
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    again = client.completions.create(model="demo", prompt="The scheduler", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == out.choices[0].text  # greedy is deterministic
    server.wait_idle()


def test_completion_sync_stream_with_usage(server: RunningServer) -> None:
    client = sync_client(server)
    chunks = list(client.completions.create(
        model="demo", prompt=[5, 6, 7, 8], max_tokens=6, stream=True, stream_options={"include_usage": True},
        logprobs=2, extra_body={"ignore_eos": True}))
    token_chunks = [c for c in chunks if c.choices]
    assert sum(len(c.choices[0].logprobs.tokens) for c in token_chunks) == 6
    assert all(len(top) <= 2 for c in token_chunks for top in c.choices[0].logprobs.top_logprobs)
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 4
    assert chunks[-1].usage.completion_tokens == 6


def test_completion_batch_and_n(server: RunningServer) -> None:
    out = sync_client(server).completions.create(model="demo", prompt=["a b", "c d e"], n=2, max_tokens=3,
                                                 seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12


def test_chat_sync(server: RunningServer) -> None:
    out = sync_client(server).chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=4, temperature=0.7, top_p=0.9, seed=1, stop=["\n\n"],
        presence_penalty=0.5, frequency_penalty=-0.5, user="u1", logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in {"length", "stop"}
    assert choice.logprobs is not None and choice.logprobs.content
    assert all(len(t.top_logprobs) <= 3 for t in choice.logprobs.content)
    assert out.usage.completion_tokens == len(choice.logprobs.content)


async def test_async_clients(server: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = await client.completions.create(model="demo", prompt="hello", max_tokens=3,
                                          extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3
    stream = await client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=5, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] and isinstance(text, str)
    assert chunks[-1].usage.completion_tokens == 5
    models = await client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert (await client.models.retrieve("demo")).id == "demo"
    await client.close()
    server.wait_idle()


def test_client_errors_are_typed(server: RunningServer) -> None:
    client = sync_client(server)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo", prompt="x", max_tokens=100_000)
    assert "256" in str(info.value) and "100000" in str(info.value)
