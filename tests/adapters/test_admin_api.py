"""The admin routes in process: off by default, guarded by their own key, loads that serve exactly what
peft gives, unloads, and every refusal as a clear OpenAI-shaped error that leaves nothing behind."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx2
import pytest

from engine import AsyncEngine, SamplingParams
from engine.demo import DemoModel
from tests.adapters.conftest import (
    ADMIN_KEY,
    API_KEY,
    GOOD_ADAPTERS,
    MAX_LORA_RANK,
    AdapterTree,
    admin_app,
    admin_headers,
    greedy_body,
    peft_greedy,
    prompt_ids,
    serve_over_tcp,
)
from tests.server.conftest import BASE, CONSULT, TCM, asgi_client, make_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

NUM_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
TIMEOUT_S = 60


async def _load(client: httpx2.AsyncClient, name: str, path: str, **extra: Any) -> httpx2.Response:
    body = {"lora_name": name, "lora_path": path, **extra}
    return await client.post("/v1/load_lora_adapter", json=body, headers=admin_headers())


async def _unload(client: httpx2.AsyncClient, name: str) -> httpx2.Response:
    return await client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=admin_headers())


async def _model_ids(client: httpx2.AsyncClient) -> list[str]:
    return [card["id"] for card in (await client.get("/v1/models")).json()["data"]]


async def _completion_text(client: httpx2.AsyncClient, model: str, ids: list[int]) -> str:
    response = await client.post("/v1/completions", json=greedy_body(model, ids, NUM_TOKENS))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == NUM_TOKENS
    return str(body["choices"][0]["text"])


def _assert_error(response: httpx2.Response, status: int, code: str | None, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["code"] == code and error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    return str(error["message"])


# ---- mounting, keys and flags --------------------------------------------------------------------------


async def test_admin_routes_do_not_exist_without_the_admin_key(engine: AsyncEngine) -> None:
    async with asgi_client(make_app(engine)) as plain:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            body = {"lora_name": "x", "lora_path": "bin-r4"}
            response = await plain.post(path, json=body, headers=admin_headers())
            _assert_error(response, 404, None, None)


async def test_admin_routes_need_the_admin_key_and_only_it(
    engine: AsyncEngine, adapter_tree: AdapterTree
) -> None:
    app = admin_app(engine, adapter_tree, api_key=API_KEY)
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": f"Bearer {ADMIN_KEY}x"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
        {"Authorization": ADMIN_KEY},
        {"Authorization": f"Bearer {API_KEY}"},  # the ordinary key opens the ordinary routes only
    ]
    async with asgi_client(app) as guarded:
        for headers in bad_headers:
            for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                body = {"lora_name": "keyed", "lora_path": "bin-r4"}
                response = await guarded.post(path, json=body, headers=headers)
                _assert_error(response, 401, "invalid_api_key", None)
                assert response.headers["www-authenticate"] == "Bearer"
        assert "keyed" not in engine.adapters()
        models = await guarded.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert models.status_code == 401  # and the admin key is not an API key
        ok = await guarded.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "keyed", "lora_path": "bin-r4"},
            headers=admin_headers(),
        )
        assert ok.status_code == 200, ok.text
        models = await guarded.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert "keyed" in [card["id"] for card in models.json()["data"]]
        await _unload(guarded, "keyed")


# ---- loading and unloading -------------------------------------------------------------------------


@pytest.mark.parametrize("folder", [*GOOD_ADAPTERS, "nested/deep-r2", "alias-r4"])
async def test_a_loaded_adapter_serves_what_peft_gives_then_unloads(
    client: httpx2.AsyncClient, engine: AsyncEngine, demo: DemoModel, adapter_tree: AdapterTree, folder: str
) -> None:
    name = "hot-" + folder.replace("/", "-")
    ids = prompt_ids(engine.tokenizer)
    loaded = await _load(client, name, folder)
    assert loaded.status_code == 200 and loaded.text == f"Success: LoRA adapter '{name}' added successfully."
    card = (await client.get(f"/v1/models/{name}")).json()
    assert card["parent"] == BASE and Path(card["root"]) == (adapter_tree.root / folder).resolve()
    assert await _model_ids(client) == sorted([BASE, CONSULT, TCM, name], key=lambda n: n != BASE)

    expected = peft_greedy(demo, adapter_tree.root / folder, ids, NUM_TOKENS)
    assert await _completion_text(client, name, ids) == engine.tokenizer.decode(expected)
    stream = engine.generate(f"ids-{name}", ids, GREEDY, name)
    got = [t async for out in stream for t in out.token_ids]
    assert got == expected

    unloaded = await _unload(client, name)
    assert unloaded.status_code == 200 and "removed" in unloaded.text
    assert name not in await _model_ids(client)
    gone = await client.post("/v1/completions", json=greedy_body(name, ids, NUM_TOKENS))
    _assert_error(gone, 404, "model_not_found", "model")
    _assert_error(await _unload(client, name), 404, "model_not_found", "lora_name")
    assert name not in engine.core.loras.host and name not in engine.core.loras.resident


async def test_adapters_change_the_output(client: httpx2.AsyncClient, engine: AsyncEngine) -> None:
    """Guards the peft comparisons above: a no-op adapter would pass them too."""
    ids = prompt_ids(engine.tokenizer)
    assert (await _load(client, "hot-check", "rs-r32")).status_code == 200
    texts = {model: await _completion_text(client, model, ids) for model in (BASE, CONSULT, "hot-check")}
    assert len(set(texts.values())) == 3
    await _unload(client, "hot-check")


async def test_replacing_needs_asking_and_then_serves_the_new_weights(
    client: httpx2.AsyncClient, engine: AsyncEngine, demo: DemoModel, adapter_tree: AdapterTree
) -> None:
    ids = prompt_ids(engine.tokenizer)
    assert (await _load(client, "swap", "bin-r4")).status_code == 200
    first = await _completion_text(client, "swap", ids)
    message = _assert_error(await _load(client, "swap", "other-seed"), 409, "adapter_exists", "lora_name")
    assert "swap" in message and "already" in message
    assert await _completion_text(client, "swap", ids) == first  # the refused load changed nothing
    for flag in ("replace", "load_inplace"):  # ours, and vLLM's name for it
        assert (await _load(client, "swap", "other-seed", **{flag: True})).status_code == 200
        expected = peft_greedy(demo, adapter_tree.root / "other-seed", ids, NUM_TOKENS)
        assert await _completion_text(client, "swap", ids) == engine.tokenizer.decode(expected)
    assert engine.adapters()["swap"] == (adapter_tree.root / "other-seed").resolve()
    await _unload(client, "swap")


async def test_unloading_an_adapter_in_use_is_refused_and_the_stream_finishes(
    engine: AsyncEngine, adapter_tree: AdapterTree
) -> None:
    async with serve_over_tcp(admin_app(engine, adapter_tree)) as client:
        await _unloading_in_use(client, engine)


async def _unloading_in_use(client: httpx2.AsyncClient, engine: AsyncEngine) -> None:
    ids = prompt_ids(engine.tokenizer)
    assert (await _load(client, "busy", "bin-r4")).status_code == 200
    body = greedy_body("busy", ids, 200, stream=True)
    async with client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.aiter_lines()
        first = await asyncio.wait_for(anext(lines), TIMEOUT_S)
        assert first.startswith("data: ")
        refused = await _unload(client, "busy")
        message = _assert_error(refused, 409, "adapter_in_use", None)
        assert "in flight" in message
        replaced = await _load(client, "busy", "rs-r32", replace=True)
        _assert_error(replaced, 409, "adapter_in_use", None)
        rest = [line async for line in lines]
    assert rest[-2:] == ["data: [DONE]", ""] and not any('"error"' in line for line in rest)
    assert "busy" in await _model_ids(client)
    await _wait_idle(engine)
    assert (await _unload(client, "busy")).status_code == 200


async def _wait_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        if not engine.core.requests:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("requests still in the engine after 10 s")


async def test_concurrent_loads_of_one_name_publish_once(client: httpx2.AsyncClient) -> None:
    results = await asyncio.gather(*(_load(client, "race", f) for f in ("bin-r4", "rs-r32", "mlp-r1")))
    assert sorted(r.status_code for r in results) == [200, 409, 409]
    await _unload(client, "race")


# ---- refusals ----------------------------------------------------------------------------------------


# (lora_path, a fragment of the message) for folders the server must refuse.
REFUSALS = [
    ("../outside/escaped", "'..'"),
    ("bin-r4/../rs-r32", "'..'"),
    ("link-out", "inside the server's adapters root"),
    ("linked-weights", "links outside the adapters root"),
    ("missing-folder", "inside the server's adapters root"),
    ("a-file", "must name a folder"),
    ("nested", "no adapter_config.json"),
    ("modules-to-save", "modules_to_save"),
    ("dora", "DoRA"),
    ("prefix-tuning", "only LoRA adapters"),
    ("rank-too-big", f"rank {MAX_LORA_RANK + 8} is outside 1..{MAX_LORA_RANK}"),
    ("bad-json", "not valid JSON"),
    ("no-config", "no adapter_config.json"),
    ("corrupt-weights", "could not be read"),
    ("resized-vocab", "embed_tokens"),
    ("wrong-shape", "do not match the base"),
    ("nan-weights", "NaN"),
]


@pytest.mark.parametrize(("lora_path", "fragment"), REFUSALS)
async def test_bad_adapters_are_refused_and_leave_nothing_behind(
    client: httpx2.AsyncClient, engine: AsyncEngine, adapter_tree: AdapterTree, lora_path: str, fragment: str
) -> None:
    before = (await _model_ids(client), dict(engine.adapters()), list(engine.core.loras.host))
    message = _assert_error(await _load(client, "refused", lora_path), 400, "adapter_error", "lora_path")
    assert fragment in message
    assert str(adapter_tree.root) not in message and str(adapter_tree.outside) not in message
    after = (await _model_ids(client), dict(engine.adapters()), list(engine.core.loras.host))
    assert after == before


async def test_absolute_paths_are_confined_too(client: httpx2.AsyncClient, adapter_tree: AdapterTree) -> None:
    inside = await _load(client, "absolute", str(adapter_tree.root / "bin-r4"))
    assert inside.status_code == 200
    await _unload(client, "absolute")
    for outside in (adapter_tree.outside / "escaped", Path("/etc"), Path("/")):
        response = await _load(client, "absolute", str(outside))
        message = _assert_error(response, 400, "adapter_error", "lora_path")
        assert "inside the server's adapters root" in message and "/" not in message


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"lora_name": "../up", "lora_path": "bin-r4"}, 400, None, "lora_name"),
        ({"lora_name": "a/b", "lora_path": "bin-r4"}, 400, None, "lora_name"),
        ({"lora_name": "", "lora_path": "bin-r4"}, 400, None, "lora_name"),
        ({"lora_name": "x" * 200, "lora_path": "bin-r4"}, 400, None, "lora_name"),
        ({"lora_name": "sp ace", "lora_path": "bin-r4"}, 400, None, "lora_name"),
        ({"lora_name": 7, "lora_path": "bin-r4"}, 400, None, "lora_name"),
        ({"lora_name": "ok"}, 400, None, "lora_path"),
        ({"lora_name": "ok", "lora_path": ""}, 400, None, "lora_path"),
        ({"lora_name": "ok", "lora_path": "bin-r4", "replace": "yes"}, 400, None, "replace"),
        ({"lora_name": "ok", "lora_path": "bin\x00r4"}, 400, "adapter_error", "lora_path"),
        ({"lora_name": BASE, "lora_path": "bin-r4"}, 409, "adapter_exists", "lora_name"),
        ({"lora_name": CONSULT, "lora_path": "bin-r4"}, 409, "adapter_exists", "lora_name"),
    ],
)
async def test_bad_load_bodies(
    client: httpx2.AsyncClient, engine: AsyncEngine, body: dict[str, Any], status: int, code: str, param: str
) -> None:
    before = dict(engine.adapters())
    response = await client.post("/v1/load_lora_adapter", json=body, headers=admin_headers())
    _assert_error(response, status, code, param)
    assert engine.adapters() == before


async def test_bad_unload_bodies_and_unknown_names(client: httpx2.AsyncClient, engine: AsyncEngine) -> None:
    before = dict(engine.adapters())
    headers = {**admin_headers(), "Content-Type": "application/json"}
    response = await client.post("/v1/unload_lora_adapter", content=b"{not json", headers=headers)
    _assert_error(response, 400, None, None)
    _assert_error(await _unload(client, "never-loaded"), 404, "model_not_found", "lora_name")
    _assert_error(await _unload(client, BASE), 404, "model_not_found", "lora_name")
    empty = await client.post("/v1/unload_lora_adapter", json={}, headers=admin_headers())
    _assert_error(empty, 400, None, "lora_name")
    assert engine.adapters() == before
