"""Served model names → the base or one of its adapters, with each model's chat template and defaults.

The base is fixed at start-up; adapters are read from the engine at every call, so adapters loaded or
removed at run time appear and disappear here at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine import CHATMED_TEMPLATE, AsyncEngine
from server.errors import UnknownModel


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling values for the fields a request leaves out. max_tokens None: all the room left."""

    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None


# The original ChatMed service's values (CHATMED.md); OpenAI's own defaults are for other models.
CHATMED_DEFAULTS = GenerationDefaults(temperature=0.2, top_p=0.9, repetition_penalty=1.3, max_tokens=400)
PLAIN_DEFAULTS = GenerationDefaults()


@dataclass(frozen=True)
class ServedModel:
    """One name a client can put in `model`."""

    name: str
    adapter: str | None  # None: the base alone
    root: Path  # the folder its weights come from
    parent: str | None  # the base's name, for adapters
    chat_template: str
    defaults: GenerationDefaults


@dataclass(frozen=True)
class BaseModelInfo:
    """What the registry knows of the base: its served name, folder, and whether it is a ChatMed model
    (the demo is) and so takes the ChatMed template and defaults."""

    name: str
    path: Path
    is_chatmed: bool


class ModelRegistry:
    """Resolves `model` to a ServedModel. Every adapter is a ChatMed adapter: ChatMed template and
    defaults. The base uses its tokenizer's own template, if any, with OpenAI-like defaults, unless it
    is a ChatMed model. A template given at start-up (`--chat-template`) overrides all of them."""

    def __init__(self, engine: AsyncEngine, base: BaseModelInfo, chat_template: str | None = None) -> None:
        self._engine = engine
        self._base_info = base
        self._template_override = chat_template

    @property
    def base_name(self) -> str:
        return self._base_info.name

    def resolve(self, name: str) -> ServedModel:
        """The served model called `name`; UnknownModel (404) when there is none."""
        if name == self._base_info.name:
            return self._base()
        path = self._engine.adapters().get(name)
        if path is None:
            raise UnknownModel(f"The model '{_clip(name)}' does not exist.", param="model")
        return self._adapter(name, path)

    def models(self) -> list[ServedModel]:
        """The base, then every adapter loaded now, by name."""
        adapters = sorted(self._engine.adapters().items())
        return [self._base()] + [self._adapter(name, path) for name, path in adapters]

    def _base(self) -> ServedModel:
        info = self._base_info
        if info.is_chatmed:
            template, defaults = CHATMED_TEMPLATE, CHATMED_DEFAULTS
        else:
            template, defaults = self._engine.tokenizer.chat_template or CHATMED_TEMPLATE, PLAIN_DEFAULTS
        return ServedModel(
            name=info.name,
            adapter=None,
            root=info.path,
            parent=None,
            chat_template=self._template_override or template,
            defaults=defaults,
        )

    def _adapter(self, name: str, path: Path) -> ServedModel:
        return ServedModel(
            name=name,
            adapter=name,
            root=path,
            parent=self._base_info.name,
            chat_template=self._template_override or CHATMED_TEMPLATE,
            defaults=CHATMED_DEFAULTS,
        )


def _clip(name: str, limit: int = 64) -> str:
    # Echo a short, printable version of the name only: the field is the client's, not ours.
    printable = "".join(ch if ch.isprintable() else "?" for ch in name)
    return printable if len(printable) <= limit else printable[:limit] + "..."
