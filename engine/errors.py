"""Typed engine errors. The server maps each class to an HTTP status and an OpenAI error body once."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. `param` names the request field at fault, when there is one."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(EngineError):
    """A request the engine cannot run as asked (bad sampling values, empty prompt)."""


class PromptTooLong(InvalidRequest):
    """Prompt plus max_tokens does not fit the context length."""


class UnknownAdapter(EngineError):
    """No adapter by that name is loaded."""


class AdapterError(EngineError):
    """An adapter could not be loaded (bad config, shapes that do not match the base, rank too big)."""


class AdapterExists(AdapterError):
    """An adapter by that name is loaded already."""


class AdapterInUse(AdapterError):
    """The adapter has requests in flight and cannot be removed now."""


class QueueFull(EngineError):
    """The waiting queue is at its limit: the caller should retry later."""


class EngineDead(EngineError):
    """The engine thread has stopped on an unrecoverable error; nothing more will run."""


class RequestFailed(EngineError):
    """This request failed inside the engine; other requests are unaffected."""
