"""Fixtures for hot-swapping: an adapters root with adapters made here (good ones of several ranks and
formats, and broken ones), an engine and an admin-enabled app over the tiny demo, and peft references."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import pytest_asyncio
import torch
import uvicorn
from fastapi import FastAPI
from safetensors.torch import load_file, save_file

from engine import CHATMED_TEMPLATE, AsyncEngine, Tokenizer
from engine.demo import DemoModel, make_adapter
from tests.server.conftest import asgi_client, make_app, make_engine

ADMIN_KEY = "admin-key-7c41e0"
API_KEY = "api-key-19f3aa"
MAX_LORA_RANK = 32
GOOD_ADAPTERS = ("bin-r4", "rs-r32", "mlp-r1")
QUESTION = "孩子咳嗽一周了，夜里加重，怎么办？"


@dataclass(frozen=True)
class AdapterTree:
    """`root`: the adapters root the server is given; `outside`: a folder beside it, never servable."""

    root: Path
    outside: Path

    def path(self, name: str) -> Path:
        return self.root / name


def _edit_config(folder: Path, **changes: Any) -> None:
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def _edit_weights(folder: Path, edit: Any) -> None:
    weights_file = folder / "adapter_model.safetensors"
    state = load_file(str(weights_file))
    edit(state)
    save_file(state, str(weights_file))


def _make_broken(root: Path, good: Path) -> None:
    """One folder per refusal, each a copy of a good safetensors adapter with one thing wrong."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, root / name))

    _edit_config(copy("modules-to-save"), modules_to_save=["lm_head", "embed_tokens"])
    _edit_config(copy("dora"), use_dora=True)
    _edit_config(copy("prefix-tuning"), peft_type="PREFIX_TUNING")
    _edit_config(copy("rank-too-big"), r=MAX_LORA_RANK + 8)
    (copy("bad-json") / "adapter_config.json").write_text("{not json")
    (copy("no-config") / "adapter_config.json").unlink()
    (copy("corrupt-weights") / "adapter_model.safetensors").write_bytes(b"\x00" * 64)

    def add_embedding(state: dict[str, torch.Tensor]) -> None:  # what a resized vocabulary saves
        state["base_model.model.model.embed_tokens.weight"] = torch.zeros(8, 4)

    def truncate_q(state: dict[str, torch.Tensor]) -> None:  # trained on a base of another width
        key = next(k for k in state if "q_proj.lora_A" in k)
        state[key] = state[key][:, :-2].contiguous()

    def poison(state: dict[str, torch.Tensor]) -> None:
        key = next(k for k in state if "lora_B" in k)
        state[key] = torch.full_like(state[key], float("nan"))

    _edit_weights(copy("resized-vocab"), add_embedding)
    _edit_weights(copy("wrong-shape"), truncate_q)
    _edit_weights(copy("nan-weights"), poison)


@pytest.fixture(scope="session")
def adapter_tree(demo: DemoModel, tmp_path_factory: pytest.TempPathFactory) -> AdapterTree:
    root = tmp_path_factory.mktemp("adapters-root")
    outside = tmp_path_factory.mktemp("outside-root")
    base = demo.base_path
    # Another format, another rank, another subset of the seven projections, each.
    subset = ("q_proj", "v_proj", "down_proj")
    make_adapter(
        base, root / "bin-r4", r=4, lora_alpha=16, target_modules=subset, seed=11, safe_serialization=False
    )
    make_adapter(base, root / "rs-r32", r=MAX_LORA_RANK, lora_alpha=64, seed=12, use_rslora=True)
    make_adapter(base, root / "mlp-r1", r=1, lora_alpha=4, target_modules=("gate_proj", "up_proj"), seed=13)
    make_adapter(base, root / "other-seed", r=8, lora_alpha=32, seed=14)
    _make_broken(root, root / "rs-r32")
    (root / "nested").mkdir()
    make_adapter(base, root / "nested" / "deep-r2", r=2, lora_alpha=8, seed=15)
    (root / "a-file").write_text("not a folder")
    # Ways out of the root: a linked folder, and a good folder whose weights file links outside.
    make_adapter(base, outside / "escaped", r=4, lora_alpha=8, seed=16)
    (root / "link-out").symlink_to(outside / "escaped", target_is_directory=True)
    linked = root / "linked-weights"
    linked.mkdir()
    shutil.copy(outside / "escaped" / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(outside / "escaped" / "adapter_model.safetensors")
    # A link that stays inside the root is fine.
    (root / "alias-r4").symlink_to(root / "bin-r4", target_is_directory=True)
    return AdapterTree(root=root, outside=outside)


@contextlib.asynccontextmanager
async def serve_over_tcp(app: FastAPI) -> AsyncIterator[httpx2.AsyncClient]:
    """Serve `app` with uvicorn on 127.0.0.1 (a port the OS picks) in this event loop, and give a client
    for it. httpx2's ASGITransport buffers a whole streamed body; a socket lets a test act mid-stream.
    The lifespan is off: the engine fixture runs the engine."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start in 5 s"
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def admin_app(engine: AsyncEngine, tree: AdapterTree, **settings: Any) -> FastAPI:
    return make_app(engine, admin_api_key=ADMIN_KEY, adapters_root=tree.root, **settings)


def admin_headers(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(demo: DemoModel) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(demo, max_lora_rank=MAX_LORA_RANK)
    engine.start()
    yield engine
    engine.shutdown()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(engine: AsyncEngine, adapter_tree: AdapterTree) -> AsyncIterator[httpx2.AsyncClient]:
    async with asgi_client(admin_app(engine, adapter_tree)) as client:
        yield client


def prompt_ids(tokenizer: Tokenizer, question: str = QUESTION) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": question}], CHATMED_TEMPLATE)


def peft_greedy(demo: DemoModel, adapter: Path | None, ids: list[int], num_tokens: int) -> list[int]:
    """transformers + peft greedy decoding of exactly `num_tokens` tokens: the reference output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no bars in `make test-slow`'s -s output
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(demo.base_path, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(ids) :]]


def greedy_body(model: str, ids: list[int], max_tokens: int, **fields: Any) -> dict[str, Any]:
    """A /v1/completions body that decodes exactly like peft_greedy (no ChatMed repetition penalty)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "repetition_penalty": 1.0,
        "ignore_eos": True,
    }
    body.update(fields)
    return body
