"""The endpoints' behaviour through the official openai client, in process, on the tiny demo."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastapi.dependencies.utils
import fastapi.routing
import httpx2
import openai
import pytest

from engine import CHATMED_TEMPLATE, AsyncEngine
from server.registry import CHATMED_DEFAULTS, PLAIN_DEFAULTS
from tests.server.conftest import BASE, CONSULT, MAX_MODEL_LEN, TCM, asgi_client, make_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

ChatBody = Callable[..., dict[str, Any]]
QUESTION = "最近总是失眠多梦，白天没精神，该怎么调理？"
MESSAGES: Any = [{"role": "user", "content": QUESTION}]


async def test_models_lists_the_base_and_each_adapter(
    client: httpx2.AsyncClient, engine: AsyncEngine
) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert list(cards) == [BASE, CONSULT, TCM]
    assert cards[BASE]["parent"] is None
    assert cards[BASE]["root"] == str(engine.config.model_path)
    for name in (CONSULT, TCM):
        assert cards[name]["parent"] == BASE
        assert cards[name]["root"] == str(engine.adapters()[name])
        assert cards[name]["object"] == "model"
        assert cards[name]["max_model_len"] == MAX_MODEL_LEN


async def test_the_sdk_lists_and_retrieves_models(oai: openai.AsyncOpenAI) -> None:
    ids = [model.id async for model in oai.models.list()]
    assert ids == [BASE, CONSULT, TCM]
    assert (await oai.models.retrieve(TCM)).id == TCM


async def test_health(client: httpx2.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize("model", [BASE, CONSULT, TCM])
async def test_chat_completion_shape_and_usage(
    oai: openai.AsyncOpenAI, engine: AsyncEngine, model: str
) -> None:
    result = await oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert result.model == model
    (choice,) = result.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason == "length"
    prompt_ids = engine.tokenizer.encode_chat(MESSAGES, CHATMED_TEMPLATE)
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt_ids), 6)
    assert result.usage.total_tokens == len(prompt_ids) + 6


async def test_adapters_change_the_answer(oai: openai.AsyncOpenAI) -> None:
    answers = set()
    for model in (BASE, CONSULT, TCM):
        result = await oai.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=12, temperature=0
        )
        answers.add(result.choices[0].message.content)
    assert len(answers) == 3


async def test_default_max_tokens_is_capped_to_the_context(
    client: httpx2.AsyncClient, chat_body: ChatBody
) -> None:
    # ChatMed's default of 400 does not fit a 256-token context: the answer gets what room is left.
    body = chat_body(ignore_eos=True)
    del body["max_tokens"]
    usage = (await client.post("/v1/chat/completions", json=body)).json()["usage"]
    assert usage["completion_tokens"] == MAX_MODEL_LEN - usage["prompt_tokens"]


async def test_n_seeded_choices_equal_single_requests_with_consecutive_seeds(oai: openai.AsyncOpenAI) -> None:
    params: Any = {"model": CONSULT, "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0}
    together = await oai.chat.completions.create(n=3, seed=100, **params)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert together.usage is not None and together.usage.completion_tokens == 30
    for i, choice in enumerate(together.choices):
        alone = await oai.chat.completions.create(seed=100 + i, **params)
        assert choice.message.content == alone.choices[0].message.content
    again = await oai.chat.completions.create(n=3, seed=100, **params)
    assert [c.message.content for c in again.choices] == [c.message.content for c in together.choices]


async def test_stop_string_cuts_the_answer(oai: openai.AsyncOpenAI) -> None:
    params: Any = {"model": TCM, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    full = (await oai.chat.completions.create(**params)).choices[0].message.content or ""
    start = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    cut = (await oai.chat.completions.create(stop=[stop, "never-seen"], **params)).choices[0]
    assert cut.message.content == full[: full.find(stop)]
    assert cut.finish_reason == "stop"


async def test_chat_logprobs(oai: openai.AsyncOpenAI) -> None:
    result = await oai.chat.completions.create(
        model=CONSULT,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"repetition_penalty": 1.0},  # so that greedy picks the raw top token
    )
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 5
    for item in logprobs.content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.logprob >= max(top.logprob for top in item.top_logprobs) - 1e-5
    plain = await oai.chat.completions.create(model=CONSULT, messages=MESSAGES, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


async def test_completions_text_and_token_ids_agree(oai: openai.AsyncOpenAI, engine: AsyncEngine) -> None:
    text = "<s>问：\n" + QUESTION + "\n答：\n"
    by_text = await oai.completions.create(model=CONSULT, prompt=text, max_tokens=8, temperature=0)
    ids = engine.tokenizer.encode(text)
    bos = engine.tokenizer.bos_token_id
    assert bos is not None and ids.count(bos) == 1  # the template's <s> is the only BOS
    by_ids = await oai.completions.create(model=CONSULT, prompt=ids, max_tokens=8, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage is not None and by_text.usage.prompt_tokens == len(ids)
    as_list = await oai.completions.create(model=CONSULT, prompt=[text], max_tokens=8, temperature=0)
    assert as_list.choices[0].text == by_text.choices[0].text


async def test_completion_logprobs(oai: openai.AsyncOpenAI) -> None:
    result = await oai.completions.create(model=TCM, prompt="舌苔", max_tokens=4, temperature=0, logprobs=2)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and len(logprobs.tokens) == 4
    assert logprobs.top_logprobs is not None and all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)


async def test_chat_content_parts_and_system_messages(oai: openai.AsyncOpenAI) -> None:
    parts: Any = [
        {"role": "system", "content": "你是医生。"},
        {"role": "user", "content": [{"type": "text", "text": "头痛"}, {"type": "text", "text": "三天了"}]},
    ]
    joined: Any = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头痛\n三天了"}]
    a = await oai.chat.completions.create(model=CONSULT, messages=parts, max_tokens=6, temperature=0)
    b = await oai.chat.completions.create(model=CONSULT, messages=joined, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage is not None and b.usage is not None and a.usage.prompt_tokens == b.usage.prompt_tokens


async def test_unknown_fields_are_ignored(client: httpx2.AsyncClient, chat_body: ChatBody) -> None:
    response = await client.post(
        "/v1/chat/completions", json=chat_body(user="u-1", store=False, metadata={"a": 1})
    )
    assert response.status_code == 200, response.text


# ---- per-model configuration --------------------------------------------------------------------------


async def test_served_model_name_renames_the_base(engine: AsyncEngine) -> None:
    async with asgi_client(make_app(engine, served_model_name="my-base")) as client:
        cards = (await client.get("/v1/models")).json()["data"]
        assert [c["id"] for c in cards] == ["my-base", CONSULT, TCM]
        assert {c["parent"] for c in cards[1:]} == {"my-base"}
        body = {"model": "my-base", "messages": MESSAGES, "max_tokens": 2}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200


async def test_a_real_base_gets_plain_defaults_and_its_folder_name(engine: AsyncEngine) -> None:
    app = make_app(engine, base_model=engine.config.model_path)
    registry = app.state.chatmed.registry
    base = registry.resolve(engine.config.model_path.name)
    assert base.defaults == PLAIN_DEFAULTS and base.adapter is None
    assert registry.resolve(CONSULT).defaults == CHATMED_DEFAULTS  # adapters stay ChatMed models


async def test_chat_template_file_overrides_every_model(engine: AsyncEngine, tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{{ bos_token }}Q: {{ messages[-1]['content'] }}\nA:", encoding="utf-8")
    expected = engine.tokenizer.encode("<s>Q: " + QUESTION + "\nA:")
    async with asgi_client(make_app(engine, chat_template=template)) as client:
        for model in (BASE, TCM):
            body = {"model": model, "messages": MESSAGES, "max_tokens": 2}
            usage = (await client.post("/v1/chat/completions", json=body)).json()["usage"]
            assert usage["prompt_tokens"] == len(expected)


async def test_a_broken_chat_template_stops_the_start(engine: AsyncEngine, tmp_path: Path) -> None:
    template = tmp_path / "broken.jinja"
    template.write_text("{% if %}", encoding="utf-8")
    with pytest.raises(ValueError):
        make_app(engine, chat_template=template)


async def test_no_request_hops_to_a_worker_thread(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FastAPI runs a plain `def` dependency or endpoint in its thread pool: a thread hop per request.
    hops: list[str] = []

    async def record(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return func(*args, **kwargs)

    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", record)
    monkeypatch.setattr(fastapi.routing, "run_in_threadpool", record)
    app = make_app(engine, api_key="key", admin_api_key="admin-key", adapters_root=tmp_path)
    user, admin = {"Authorization": "Bearer key"}, {"Authorization": "Bearer admin-key"}
    chat = {"model": TCM, "messages": [{"role": "user", "content": "头痛"}], "max_tokens": 2}
    async with asgi_client(app) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/v1/models", headers=user)).status_code == 200
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await client.post("/v1/chat/completions", json=chat, headers=user)).status_code == 200
        body = {"lora_name": "nowhere", "lora_path": "missing"}
        response = await client.post("/v1/load_lora_adapter", json=body, headers=admin)
        assert response.status_code in (400, 404)
    assert hops == []
