"""T1: hand-written bad inputs, each answered with its exact status, OpenAI's error body and the right
`param`, none of them reaching the engine or costing it anything.

Figure: bad inputs tried, and how many got a 5xx (must be 0).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx2
import pytest

from engine import AsyncEngine
from tests.reliability.conftest import CONSULT, MAX_MODEL_LEN, chat, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON = "application/json"
MiB = 1024 * 1024


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": CONSULT, "prompt": "<s>问：\n头痛\n答：\n", "max_tokens": 4} | fields


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def raw_chat(tail: bytes) -> bytes:
    """A valid chat body with extra raw JSON text (NaN, Infinity, huge numbers) before its end."""
    return json.dumps(chat()).encode()[:-1] + b", " + tail + b"}"


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


# (path, body: a dict to send as JSON or raw bytes, content type, status, param)
Case = tuple[str, "dict[str, Any] | bytes", str, int, str | None]

BAD_CHAT: list[Case] = [
    (CHAT, chat(temperature="hot"), JSON, 400, "temperature"),
    (CHAT, chat(temperature=-1), JSON, 400, "temperature"),
    (CHAT, chat(temperature=2.5), JSON, 400, "temperature"),
    (CHAT, raw_chat(b'"top_p": NaN'), JSON, 400, "top_p"),
    (CHAT, raw_chat(b'"temperature": Infinity'), JSON, 400, "temperature"),
    (CHAT, raw_chat(b'"presence_penalty": -Infinity'), JSON, 400, "presence_penalty"),
    (CHAT, chat(n=0), JSON, 400, "n"),
    (CHAT, chat(n=10**6), JSON, 400, "n"),
    (CHAT, chat(n=-1), JSON, 400, "n"),
    (CHAT, chat(n=1.5), JSON, 400, "n"),
    (CHAT, chat(n=True), JSON, 400, "n"),
    (CHAT, chat(max_tokens=0), JSON, 400, "max_tokens"),
    (CHAT, chat(max_tokens=-1), JSON, 400, "max_tokens"),
    (CHAT, chat(max_tokens=10**9), JSON, 400, "max_tokens"),
    (CHAT, chat(max_tokens="10"), JSON, 400, "max_tokens"),
    (CHAT, chat(max_completion_tokens=0), JSON, 400, "max_completion_tokens"),
    (CHAT, chat(messages=[]), JSON, 400, "messages"),
    (CHAT, chat(messages=None), JSON, 400, "messages"),
    (CHAT, chat(messages={}), JSON, 400, "messages"),
    (CHAT, chat(messages=["hello"]), JSON, 400, "messages[0]"),
    (CHAT, chat(messages=[{"role": "robot", "content": "x"}]), JSON, 400, "messages[0].role"),
    (CHAT, chat(messages=[{"content": "x"}]), JSON, 400, "messages[0].role"),
    (CHAT, chat(messages=user(5)), JSON, 400, "messages[0].content"),
    (
        CHAT,
        chat(messages=user([{"type": "image_url", "image_url": {"url": "x"}}])),
        JSON,
        400,
        "messages[0].content",
    ),
    (CHAT, chat(messages=user("\ud800")), JSON, 400, "messages[0].content"),
    (CHAT, chat(messages=user([[[[["深"]]]]])), JSON, 400, "messages[0].content"),
    (CHAT, chat(messages=[{"role": "assistant", "content": "你好"}]), JSON, 400, "messages"),
    (CHAT, chat(messages=user("问" * (4 * MAX_MODEL_LEN)), max_tokens=None), JSON, 400, "messages"),
    (CHAT, chat(stop=[f"s{i}" for i in range(17)]), JSON, 400, "stop"),
    (CHAT, chat(stop="x" * 1000), JSON, 400, "stop"),
    (CHAT, chat(stop=["ok", "x" * 1000]), JSON, 400, "stop"),
    (CHAT, chat(stop=""), JSON, 400, "stop"),
    (CHAT, chat(stop=[""]), JSON, 400, "stop"),
    (CHAT, chat(stop=5), JSON, 400, "stop"),
    (CHAT, chat(model=7), JSON, 400, "model"),
    (CHAT, without(chat(), "model"), JSON, 400, "model"),
    (CHAT, chat(model=""), JSON, 400, "model"),
    (CHAT, chat(model="x" * 1000), JSON, 400, "model"),
    (CHAT, chat(model="gpt-4o"), JSON, 404, "model"),
    (CHAT, chat(model="../../etc/passwd"), JSON, 404, "model"),
    (CHAT, chat(model="chatmed-consult/../chatmed-tcm"), JSON, 404, "model"),
    (CHAT, chat(model="/work/shared"), JSON, 404, "model"),
    (CHAT, chat(seed=-1), JSON, 400, "seed"),
    (CHAT, chat(seed=2**70), JSON, 400, "seed"),
    (CHAT, chat(top_k=-5), JSON, 400, "top_k"),
    (CHAT, chat(repetition_penalty=0), JSON, 400, "repetition_penalty"),
    (CHAT, chat(presence_penalty=5), JSON, 400, "presence_penalty"),
    (CHAT, chat(frequency_penalty=-3), JSON, 400, "frequency_penalty"),
    (CHAT, chat(logprobs="yes"), JSON, 400, "logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs=21), JSON, 400, "top_logprobs"),
    (CHAT, chat(top_logprobs=2), JSON, 400, "top_logprobs"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), JSON, 400, "tools"),
    (CHAT, chat(response_format={"type": "json_object"}), JSON, 400, "response_format"),
    (CHAT, chat(logit_bias={"1": 5}), JSON, 400, "logit_bias"),
    (CHAT, chat(stream="yes"), JSON, 400, "stream"),
    (CHAT, chat(stream=True, stream_options={"include_usage": 1}), JSON, 400, "stream_options.include_usage"),
    (CHAT, chat(min_tokens=50, max_tokens=5), JSON, 400, "min_tokens"),
]

BAD_COMPLETIONS: list[Case] = [
    (COMPLETIONS, without(completion(), "prompt"), JSON, 400, "prompt"),
    (COMPLETIONS, completion(prompt=5), JSON, 400, "prompt"),
    (COMPLETIONS, completion(prompt=[]), JSON, 400, "prompt"),
    (COMPLETIONS, completion(prompt=[-1]), JSON, 400, "prompt"),
    (COMPLETIONS, completion(prompt=[10**6]), JSON, 400, "prompt"),
    (COMPLETIONS, completion(prompt=[[1, 2], [3, 4]]), JSON, 400, "prompt"),
    (COMPLETIONS, completion(prompt=["一", "二"]), JSON, 400, "prompt"),
    (COMPLETIONS, completion(prompt="\udfff"), JSON, 400, "prompt"),
    (COMPLETIONS, completion(prompt="问" * (4 * MAX_MODEL_LEN), max_tokens=None), JSON, 400, "prompt"),
    (COMPLETIONS, completion(max_tokens=10**9), JSON, 400, "max_tokens"),
    (COMPLETIONS, completion(echo=True), JSON, 400, "echo"),
    (COMPLETIONS, completion(suffix="。"), JSON, 400, "suffix"),
    (COMPLETIONS, completion(best_of=3), JSON, 400, "best_of"),
    (COMPLETIONS, completion(logprobs=21), JSON, 400, "logprobs"),
    (COMPLETIONS, completion(n=100), JSON, 400, "n"),
    (COMPLETIONS, completion(model="../adapters/evil"), JSON, 404, "model"),
]

MALFORMED: list[Case] = [
    (CHAT, b'{"model": "chatmed-consult", "messages": [', JSON, 400, None),
    (CHAT, b"", JSON, 400, None),
    (CHAT, b"[1, 2, 3]", JSON, 400, None),
    (CHAT, b'"hello"', JSON, 400, None),
    (CHAT, b"null", JSON, 400, None),
    (CHAT, b"\xff\xfe\x00{", JSON, 400, None),
    (CHAT, raw_chat(b'"seed": ' + b"9" * 5000), JSON, 400, None),
    (CHAT, raw_chat(b'"n": ' + b"1" * 5000), JSON, 400, None),
    (CHAT, b"[" * 100_000 + b"]" * 100_000, JSON, 400, None),
    (CHAT, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, JSON, 400, None),
    (CHAT, json.dumps(chat()).encode(), "text/plain", 400, None),
    (CHAT, b"model=chatmed-consult", "application/x-www-form-urlencoded", 400, None),
    (CHAT, json.dumps(chat()).encode(), "", 400, None),
    (COMPLETIONS, b"{", JSON, 400, None),
    (COMPLETIONS, json.dumps(completion(prompt="x" * (2 * MiB))).encode(), JSON, 413, None),
    (CHAT, json.dumps(chat(messages=user("痛" * MiB))).encode(), JSON, 413, None),
]

ALL_CASES = BAD_CHAT + BAD_COMPLETIONS + MALFORMED


async def _post(client: httpx2.AsyncClient, case: Case) -> httpx2.Response:
    path, body, content_type, _, _ = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": content_type} if content_type else {}
    return await client.post(path, content=content, headers=headers)


def _check(response: httpx2.Response, case: Case) -> None:
    *_, status, param = case
    assert response.status_code == status, f"{case[0]} {str(case[1])[:120]}: {response.text[:300]}"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and 0 < len(error["message"]) < 500
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, f"{str(case[1])[:120]}: {error}"


async def test_every_bad_input_gets_its_status_and_an_openai_body(
    client: httpx2.AsyncClient, engine: AsyncEngine
) -> None:
    assert len(ALL_CASES) >= 60
    before = engine.stats()
    statuses: Counter[int] = Counter()
    for case in ALL_CASES:
        response = await _post(client, case)
        statuses[response.status_code] += 1
        _check(response, case)
    after = engine.stats()
    # Nothing reached the engine: no prompt tokens counted, nothing queued, every block free.
    assert after.num_prompt_tokens_total == before.num_prompt_tokens_total
    assert (after.num_running, after.num_waiting) == (0, 0)
    assert after.num_free_blocks == after.num_total_blocks and not engine.is_dead
    fresh = await client.post(CHAT, json=chat())
    assert fresh.status_code == 200 and fresh.json()["choices"][0]["finish_reason"] == "length"
    num_5xx = sum(count for status, count in statuses.items() if status >= 500)
    print(
        f"\nT1 bad inputs: tried {len(ALL_CASES)}, 5xx {num_5xx}, statuses {dict(sorted(statuses.items()))}"
    )
    assert num_5xx == 0


# Valid but extreme settings: each passes validation, and some push logits past float32 (a penalty of
# 5e-324 is 0 in float32, so a repeated id's logit becomes +inf). Each must be served.
EXTREME_SETTINGS: list[dict[str, Any]] = [
    {"repetition_penalty": 5e-324, "temperature": 0.7},
    {"repetition_penalty": 5e-324, "temperature": 0.7, "top_p": 0.9},
    {"repetition_penalty": 1e-40, "temperature": 1.0, "top_k": 3},
    {"repetition_penalty": 5e-324, "temperature": 0},
    {"repetition_penalty": 10, "temperature": 0.7},
    {"temperature": 1.2e-5, "top_p": 5e-324},
    {"temperature": 2, "top_p": 1e-300, "frequency_penalty": 2, "presence_penalty": -2},
]


@pytest.mark.parametrize(
    "settings", EXTREME_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
async def test_extreme_valid_settings_are_served(
    client: httpx2.AsyncClient, engine: AsyncEngine, settings: dict[str, Any]
) -> None:
    response = await client.post(CHAT, json=chat(model=CONSULT, max_tokens=6, seed=3, **settings))
    assert response.status_code == 200, response.text[:300]
    assert response.json()["usage"]["completion_tokens"] == 6
    assert not engine.is_dead


async def test_a_long_completion_prompt_with_max_tokens_names_prompt(client: httpx2.AsyncClient) -> None:
    response = await client.post(COMPLETIONS, json=completion(prompt=[5] * (MAX_MODEL_LEN + 10)))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


async def test_wrong_methods_and_paths_keep_the_openai_shape(client: httpx2.AsyncClient) -> None:
    for method, path, status in [
        ("GET", CHAT, 405),
        ("PUT", "/v1/models", 405),
        ("POST", "/v1/nothing", 404),
    ]:
        response = await client.request(method, path, json={})
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_bad_stream_request_is_refused_before_any_frame(
    client: httpx2.AsyncClient, engine: AsyncEngine
) -> None:
    response = await client.post(CHAT, json=chat(stream=True, max_tokens=10**9))
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/json")
    await wait_until_idle(engine)
