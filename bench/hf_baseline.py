"""The original ChatMed service's way to generate, kept as the baseline every speed-up is measured
against: transformers `generate` on a PeftModel holding both adapters, `set_adapter` per request, one
request at a time, no batching. Shared by bench/engine.py and bench/baseline_server.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import CHATMED_TEMPLATE

logger = logging.getLogger(__name__)

# The ChatMed generation defaults of the original service (CHATMED.md).
CHATMED_TEMPERATURE = 0.2
CHATMED_TOP_P = 0.9
CHATMED_REPETITION_PENALTY = 1.3
CHATMED_MAX_NEW_TOKENS = 400

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GenerateOptions:
    """Sampling for one request; temperature 0 means greedy. min_new_tokens == max_new_tokens
    forces exactly max_new_tokens tokens (the benchmark's ignore-EOS)."""

    max_new_tokens: int = CHATMED_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    temperature: float = CHATMED_TEMPERATURE
    top_p: float = CHATMED_TOP_P
    repetition_penalty: float = CHATMED_REPETITION_PENALTY
    seed: int | None = None


class PeftGenerator:
    """A base model with any number of LoRA adapters loaded through peft; one request at a time.

    Not thread-safe: callers serialise generate() (the baseline server holds a global lock), as the
    original Flask service effectively did with its single model.
    """

    def __init__(
        self,
        base_path: Path,
        adapters: Sequence[tuple[str, Path]] = (),
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=_DTYPES[dtype])
        model: Any = base
        for i, (name, path) in enumerate(adapters):
            if i == 0:
                model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
            else:
                model.load_adapter(str(path), adapter_name=name)
        self.model = model.to(self.device).eval()
        self.adapter_names = tuple(name for name, _ in adapters)
        self.max_model_len = int(getattr(base.config, "max_position_embeddings", 2048))
        self.eos_token_id = self.tokenizer.eos_token_id
        logger.info("baseline model loaded with adapters %s", list(self.adapter_names))

    def generate(self, prompt_ids: Sequence[int], adapter: str | None, options: GenerateOptions) -> list[int]:
        """The new token ids for one prompt, under `adapter` (None: the bare base model)."""
        if adapter is not None and adapter not in self.adapter_names:
            raise KeyError(adapter)
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        kwargs = _generate_kwargs(options, self.eos_token_id)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        with torch.inference_mode():
            if adapter is None and self.adapter_names:
                with self.model.disable_adapter():
                    output = self.model.generate(input_ids=input_ids, **kwargs)
            else:
                if adapter is not None:
                    self.model.set_adapter(adapter)
                output = self.model.generate(input_ids=input_ids, **kwargs)
        return [int(token) for token in output[0, input_ids.shape[1] :].tolist()]

    def chatmed_prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the ChatMed prompt `<s>问：\\n{q}\\n答：\\n` for a conversation.

        Rendered with the engine's CHATMED_TEMPLATE through transformers, so both systems see the same
        text; the template writes `<s>` itself, hence no extra special tokens (one BOS, not two).
        Raises ValueError for a conversation the template refuses (e.g. not ending with a user turn).
        """
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), chat_template=CHATMED_TEMPLATE, add_generation_prompt=True, tokenize=False
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the ChatMed template refused these messages: {exc}") from exc
        return [int(i) for i in self.tokenizer.encode(str(text), add_special_tokens=False)]


def _generate_kwargs(options: GenerateOptions, eos_token_id: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": options.max_new_tokens,
        "min_new_tokens": options.min_new_tokens,
        "repetition_penalty": options.repetition_penalty,
        "num_beams": 1,
        "pad_token_id": eos_token_id,
    }
    if options.temperature > 0:
        kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs
