"""ChatMed Serve's engine: continuous batching of many LoRA adapters over one LLaMA. No web imports."""

from engine.async_engine import AsyncEngine, RequestStream
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.tokenizer import CHATMED_TEMPLATE, Tokenizer
from engine.types import EngineStats, FinishReason, RequestOutput, SamplingParams, TokenLogprob

__all__ = [
    "CHATMED_TEMPLATE",
    "AsyncEngine",
    "EngineConfig",
    "EngineCore",
    "EngineStats",
    "FinishReason",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "TokenLogprob",
    "Tokenizer",
]
