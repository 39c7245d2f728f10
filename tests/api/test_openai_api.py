"""The real server driven by the official openai SDK (sync and async) and by curl -N."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from engine import CHATMED_TEMPLATE, EngineCore, SamplingParams
from engine.demo import DemoModel
from tests.api.conftest import MAX_MODEL_LEN, RunningServer
from tests.conftest import engine_config

BASE, CONSULT, TCM = "chatmed-demo-base", "chatmed-consult", "chatmed-tcm"
QUESTION = "孩子咳嗽一周了，夜里加重，需要吃什么药？"


def messages(question: str) -> Any:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0) as client:
        yield client


def async_client(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0)


def greedy(client: openai.OpenAI, model: str, question: str, max_tokens: int = 16) -> str:
    result = client.chat.completions.create(
        model=model, messages=messages(question), max_tokens=max_tokens, temperature=0
    )
    return result.choices[0].message.content or ""


# ---- basics -------------------------------------------------------------------------------------------


def test_models_and_health(server: RunningServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [BASE, CONSULT, TCM]
    assert httpx2.get(server.base_url + "/health").json() == {"status": "ok"}


def test_the_key_is_required_but_not_for_health(server: RunningServer) -> None:
    assert httpx2.get(server.base_url + "/health").status_code == 200
    response = httpx2.get(server.v1 + "/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_errors_over_the_socket(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=messages(QUESTION))
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=CONSULT, messages=messages(QUESTION), max_tokens=10 * MAX_MODEL_LEN
        )
    assert bad.value.param == "max_tokens"


@pytest.mark.parametrize("model", [BASE, CONSULT, TCM])
def test_sync_chat_on_each_model(client: openai.OpenAI, model: str) -> None:
    result = client.chat.completions.create(
        model=model, messages=messages(QUESTION), max_tokens=8, temperature=0
    )
    assert result.model == model and result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 8


# ---- streaming ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [BASE, CONSULT, TCM])
async def test_async_stream_equals_non_streamed(server: RunningServer, model: str) -> None:
    async with async_client(server) as client:
        params: Any = {"model": model, "messages": messages(QUESTION), "max_tokens": 20, "temperature": 0}
        whole = await client.chat.completions.create(**params)
        stream = await client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **params
        )
        chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices]
    assert len(content) >= 3  # role, deltas, finish: the frames arrived one by one
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_sync_completion_stream_equals_non_streamed(client: openai.OpenAI) -> None:
    params: Any = {
        "model": TCM,
        "prompt": "<s>问：\n" + QUESTION + "\n答：\n",
        "max_tokens": 16,
        "temperature": 0,
    }
    whole = client.completions.create(**params)
    text = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **params))
    assert text == whole.choices[0].text


def _curl(server: RunningServer, path: str, body: dict[str, Any]) -> str:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = [
        "curl", "-sS", "-N", "--max-time", "60", server.v1 + path,
        "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {server.api_key}",
        "-d", json.dumps(body),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, check=True, timeout=90).stdout.decode("utf-8")


def test_curl_stream_framing(server: RunningServer) -> None:
    body = {"model": CONSULT, "messages": messages(QUESTION), "max_tokens": 10, "temperature": 0}
    raw = _curl(server, "/chat/completions", {**body, "stream": True})
    assert raw.endswith("data: [DONE]\n\n")
    events = [e for e in raw.split("\n\n")[:-1] if not e.startswith(":")]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = json.loads(_curl(server, "/chat/completions", body))
    assert streamed == whole["choices"][0]["message"]["content"]


def test_leaving_mid_stream_aborts_and_the_server_goes_on(
    server: RunningServer, client: openai.OpenAI
) -> None:
    body = {
        "model": CONSULT,
        "messages": messages(QUESTION),
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx2.stream("POST", server.v1 + "/chat/completions", json=body, headers=headers) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        request_id = json.loads(first[len("data: ") :])["id"]
    # The server notices the closed socket and aborts; a bounded wait for its log line.
    for _ in range(200):
        if f"request {request_id}: closed before it finished" in server.log():
            break
        time.sleep(0.05)
    assert f"request {request_id}: closed before it finished" in server.log()
    assert greedy(client, CONSULT, QUESTION, max_tokens=4)


# ---- correctness against the engine -------------------------------------------------------------------


def test_greedy_through_the_api_equals_the_engine(demo: DemoModel, client: openai.OpenAI) -> None:
    # The server's default dtype (auto: bfloat16 on a CPU with bfloat16 matrix instructions).
    core = EngineCore(engine_config(demo, max_model_len=MAX_MODEL_LEN, dtype="auto"))
    prompt_ids = core.tokenizer.encode_chat(messages(QUESTION), CHATMED_TEMPLATE)
    # The demo base and both adapters take ChatMed's defaults: top_p 0.9 and repetition_penalty 1.3.
    params = SamplingParams(max_tokens=16, temperature=0, top_p=0.9, repetition_penalty=1.3)
    for model, adapter in [(BASE, None), (CONSULT, CONSULT), (TCM, TCM)]:
        # One at a time, as the server gets them here.
        reference = core.generate([prompt_ids], params, adapters=[adapter])[0]
        assert greedy(client, model, QUESTION) == reference.text


async def test_both_adapters_at_once_each_get_their_own_answer(
    server: RunningServer, client: openai.OpenAI, consult_questions: list[str], tcm_questions: list[str]
) -> None:
    jobs = [(CONSULT, q) for q in consult_questions] + [(TCM, q) for q in tcm_questions]
    async with async_client(server) as aclient:
        results = await asyncio.gather(
            *(
                aclient.chat.completions.create(model=m, messages=messages(q), max_tokens=12, temperature=0)
                for m, q in jobs
            )
        )
    together = [r.choices[0].message.content for r in results]
    alone = [greedy(client, m, q, max_tokens=12) for m, q in jobs]
    assert together == alone


def test_n_with_a_seed_equals_single_requests(client: openai.OpenAI) -> None:
    params: Any = {"model": TCM, "messages": messages(QUESTION), "max_tokens": 10, "temperature": 0.9}
    together = client.chat.completions.create(n=2, seed=2024, **params)
    assert together.usage is not None and together.usage.completion_tokens == 20
    for i, choice in enumerate(together.choices):
        alone = client.chat.completions.create(seed=2024 + i, **params)
        assert choice.message.content == alone.choices[0].message.content


def test_stop_strings(client: openai.OpenAI) -> None:
    full = greedy(client, CONSULT, QUESTION, max_tokens=24)
    start = next(i for i in range(3, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    cut = client.chat.completions.create(
        model=CONSULT, messages=messages(QUESTION), max_tokens=24, temperature=0, stop=stop
    )
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_prompts_never_reach_the_log(server: RunningServer, client: openai.OpenAI) -> None:
    marker = "隐私标记-CANARY-31337"
    greedy(client, CONSULT, marker, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CONSULT, messages=messages(marker), n=0)
    assert marker not in server.log()
