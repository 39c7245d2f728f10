"""Shared fixtures: the tiny demo model (built once per session) and engine configs over it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter. It must be chosen before anything
# imports triton (transformers and torch may), so here, before the test modules load.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.config import EngineConfig
from engine.demo import DemoModel, DemoSpec, build_demo

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "chatmed"


@pytest.fixture(scope="session", autouse=True)
def _no_chatmed_environment() -> Iterator[None]:
    """Settings read CHATMED_* variables: the caller's own (an API key, a base model) stay out of tests."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("CHATMED_")]:
            patch.delenv(name)
        yield


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    return build_demo(DemoSpec.tiny(), cache_dir=tmp_path_factory.mktemp("demo-cache"))


def engine_config(demo: DemoModel, **overrides: object) -> EngineConfig:
    """An EngineConfig over the demo with both adapters and a small KV cache; overrides win."""
    values: dict[str, object] = {
        "model_path": demo.base_path,
        "adapters": tuple(demo.adapters.items()),
        "num_kv_blocks": 256,
        "block_size": 16,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 256,
    }
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


def transformers_greedy(
    demo: DemoModel, prompt: list[int], adapter: str | None, num_tokens: int
) -> list[int]:
    """The reference: transformers (+ peft for an adapter) greedy tokens in float32 on the CPU, EOS kept
    from ending the run early, as `ignore_eos` does for the engine."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(demo.base_path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, demo.adapters[adapter])
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False
        )
    return list(out[0, len(prompt) :].tolist())
