"""Text in and out: chat messages → prompt ids, and output ids → UTF-8-safe streamed text with stop strings.

Three pieces, used per request by the engine core:
  Tokenizer               wraps the model folder's `AutoTokenizer`; renders chat templates in a sandbox
  IncrementalDetokenizer  output ids → text deltas that never split a character, joined == decode(ids)
  StopChecker             text deltas → text that is safe to emit, and the stop string that ended it
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.errors import InvalidRequest

logger = logging.getLogger(__name__)

# The ChatMed format (CHATMED.md): each finished turn is a complete training sample
# `<s>问：\n{q}\n答：\n{a}\n</s>`, and the new question ends the prompt as `<s>问：\n{q}\n答：\n`.
# Extensions, since ChatMed trained neither system prompts nor multi-turn:
#   - system messages (any number, anywhere) are joined with "\n" and put before the first question's
#     text, separated from it by "\n": `<s>问：\n{system}\n{q1}\n答：\n`;
#   - consecutive user messages are joined with "\n" into one question;
#   - an assistant message with no question before it (a greeting) becomes a sample with an empty question.
# The last message must come from the user. `bos_token`/`eos_token` are `<s>`/`</s>` for LLaMA tokenizers;
# using the variables keeps the template usable by transformers' own `apply_chat_template` too.
CHATMED_TEMPLATE = r"""
{%- if messages | length == 0 -%}
    {{- raise_exception('messages must not be empty') -}}
{%- endif -%}
{%- if messages[-1]['role'] != 'user' -%}
    {{- raise_exception('the last message must have role "user"') -}}
{%- endif -%}
{%- set ns = namespace(head='', question='', asked=false) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if message['content'] -%}
            {%- set ns.head = ns.head ~ ('\n' if ns.head else '') ~ message['content'] -%}
        {%- endif -%}
    {%- elif message['role'] not in ('user', 'assistant') -%}
        {{- raise_exception('unsupported role: ' ~ message['role'][:32]) -}}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages if message['role'] != 'system' -%}
    {%- if message['role'] == 'user' -%}
        {%- set ns.question = ns.question ~ ('\n' if ns.asked else '') ~ message['content'] -%}
        {%- set ns.asked = true -%}
    {%- else -%}
        {{- bos_token ~ '问：\n' ~ ns.head ~ ('\n' if ns.head and ns.question else '') ~ ns.question -}}
        {{- '\n答：\n' ~ message['content'] ~ '\n' ~ eos_token -}}
        {%- set ns.head = '' -%}
        {%- set ns.question = '' -%}
        {%- set ns.asked = false -%}
    {%- endif -%}
{%- endfor -%}
{{- bos_token ~ '问：\n' ~ ns.head ~ ('\n' if ns.head and ns.question else '') ~ ns.question ~ '\n答：\n' -}}
"""

# A bare base model served without an adapter shares the ChatMed base, so it gets the same format unless
# its folder brings a template of its own (Tokenizer.chat_template), which the registry then prefers.
PLAIN_TEMPLATE = CHATMED_TEMPLATE

_REPLACEMENT = "\ufffd"
_METASPACE = "▁"


def _raise_exception(message: str) -> NoReturn:
    """Exposed to templates as `raise_exception`, the name transformers' chat templates use."""
    raise InvalidRequest(str(message), param="messages")


def _is_byte_piece(piece: str) -> bool:
    """`<0xE4>`: the pieces that the ByteFallback decoder turns back into raw bytes."""
    if len(piece) != 6 or not piece.startswith("<0x") or not piece.endswith(">"):
        return False
    return all(c in "0123456789abcdefABCDEF" for c in piece[3:5])


class Tokenizer:
    """Wraps transformers.AutoTokenizer loaded from a model folder.

    Besides encode/decode it records what the streaming detokenizer needs: `special_ids` (tokens that
    decode() skips) and `byte_ids` (byte-fallback pieces such as `<0xE4>`).
    Thread-safety: encode/decode may run on the event loop's worker threads and the engine thread at
    once; the Rust tokenizer is shared read-only (no truncation or padding state is ever changed).
    """

    def __init__(self, path: Path) -> None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {path}")
        self._tok: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._backend: Any = _plain_backend(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer in {path} has no EOS token")
        self.eos_token_id: int = int(eos)
        bos = self._tok.bos_token_id
        self.bos_token_id: int | None = None if bos is None else int(bos)
        self.vocab_size: int = len(self._tok)
        self.chat_template: str | None = self._own_template()
        # Decided by decoding each added token alone, so that it agrees with decode() by construction.
        self.special_ids: frozenset[int] = frozenset(
            i for i in self._tok.added_tokens_decoder if self.decode([i]) == ""
        )
        self.byte_ids: frozenset[int] = frozenset(
            i for piece, i in self._tok.get_vocab().items() if _is_byte_piece(piece)
        )
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._env.globals["raise_exception"] = _raise_exception
        self._templates: dict[str, jinja2.Template] = {}
        logger.debug(
            "tokenizer: %d tokens, %d special, %d byte-fallback, own chat template: %s",
            self.vocab_size,
            len(self.special_ids),
            len(self.byte_ids),
            self.chat_template is not None,
        )

    def _own_template(self) -> str | None:
        template = getattr(self._tok, "chat_template", None)
        if isinstance(template, dict):  # folders may ship several named templates
            template = template.get("default")
        return template if isinstance(template, str) and template else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of `text`; with add_bos, a BOS is put first unless the text already starts with one."""
        ids = [int(i) for i in self._tok.encode(text, add_special_tokens=False)]
        bos = self.bos_token_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, str]], template: str) -> str:
        """The prompt text for `messages`. Bad conversations raise InvalidRequest(param="messages");
        a template that does not compile raises ValueError (a configuration error, not the client's)."""
        plain = [_check_message(m) for m in messages]
        compiled = self._compile(template)
        try:
            return compiled.render(
                messages=plain,
                bos_token=self._tok.bos_token or "",
                eos_token=self._tok.eos_token or "",
                add_generation_prompt=True,
            )
        except InvalidRequest:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, LookupError) as exc:
            # The message stays generic: template errors can quote the conversation.
            raise InvalidRequest(
                f"the chat template rejected these messages ({type(exc).__name__})", param="messages"
            ) from exc

    def _compile(self, template: str) -> jinja2.Template:
        compiled = self._templates.get(template)
        if compiled is None:
            try:
                compiled = self._env.from_string(template)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"chat template does not compile: {exc.message}") from exc
            self._templates[template] = compiled
        return compiled

    def encode_chat(self, messages: Sequence[Mapping[str, str]], template: str) -> list[int]:
        """Prompt ids for `messages`, starting with exactly one BOS.

        The template writes `<s>` itself, so the text is encoded without the tokenizer's own special
        tokens (a second BOS degrades ChatMed's output); a BOS is only added if the template wrote none.
        """
        return self.encode(self.render_chat(messages, template), add_bos=True)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped. No clean-up of spaces: it is not local to the tokens
        decoded, which would break streaming, and it alters Chinese punctuation spacing."""
        if self._backend is not None:
            text: str = self._backend.decode(list(ids), skip_special_tokens=True)
        else:
            text = self._tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    def token_text(self, token_id: int) -> str:
        """A display string for one token (logprobs): its text with leading spaces kept; the raw piece
        for special and byte tokens (`</s>`, `<0xE4>`); "" for an id outside the vocabulary."""
        piece = self._tok.convert_ids_to_tokens(token_id) if 0 <= token_id < self.vocab_size else None
        if not isinstance(piece, str):
            return ""
        if token_id in self.special_ids or token_id in self.byte_ids:
            return piece
        if _METASPACE in piece:
            # decode() drops the leading space of a sequence's first token; shown alone, keep it.
            return piece.replace(_METASPACE, " ")
        return self.decode([token_id])


def _plain_backend(tok: Any) -> Any:
    """The Rust tokenizer behind a fast tokenizer whose class decodes the standard way, else None.

    decode() of such a tokenizer converts its arguments and calls the backend's decode (no clean-up is
    asked for here); the conversion costs more than decoding the few ids the streaming detokenizer
    passes, twice per token. A class that changes decoding keeps going through transformers."""
    cls = type(tok)
    standard = (
        isinstance(tok, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerFast.decode
        and cls._decode is PreTrainedTokenizerFast._decode
    )
    return tok.backend_tokenizer if standard else None


def _check_message(message: Mapping[str, str]) -> dict[str, str]:
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
        raise InvalidRequest("each message needs a string role and content", param="messages")
    return {"role": role, "content": content}


class IncrementalDetokenizer:
    """Per request. push() takes each new output token id and returns the text that is now final.

    Invariant: "".join(pushes) + flush() == tokenizer.decode(output_ids), byte for byte.

    Each step decodes a small window, `ids[prefix:]`, and emits what it adds to the text of
    `ids[prefix:read]` (already emitted). The window's first tokens are context: the decoder drops the
    leading space of a sequence's first token, so decoding a new token alone would lose it. Held back:
    - a run of byte-fallback tokens (`<0xE4><0xB8><0xAD>`) until a non-byte token or the end: the
      ByteFallback decoder turns a whole run into U+FFFD when any of its bytes is invalid, so no part of
      a run is final before the run ends;
    - text ending in U+FFFD, which for byte-level BPE tokenizers is a character still incomplete.
    Special tokens (skipped by decode()) and ids outside the vocabulary are dropped on arrival.
    `prompt_ids` are not used as context: the output text is defined as the decode of the output alone.
    """

    _TRIM_AT = 256  # drop consumed ids from the front in batches: O(1) amortised, bounded memory

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []  # output ids that produce text, from the window's start on
        self._prefix = 0  # window start
        self._read = 0  # ids[:read] are emitted

    def push(self, token_id: int) -> str:
        tok = self._tokenizer
        if token_id in tok.special_ids or not 0 <= token_id < tok.vocab_size:
            return ""
        self._ids.append(token_id)
        if token_id in tok.byte_ids:
            return ""
        return self._advance(final=False)

    def flush(self) -> str:
        """At finish: whatever is still held back (with U+FFFD where the output ended mid-character,
        exactly as a full decode gives it)."""
        if self._read == len(self._ids):
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        ids, decode = self._ids, self._tokenizer.decode
        emitted = decode(ids[self._prefix : self._read])
        text = decode(ids[self._prefix :])
        if not final and text.endswith(_REPLACEMENT):
            return ""
        # The window starts and ends after a non-byte token, so the decoder's text splits there.
        self._prefix, self._read = self._read, len(ids)
        if self._prefix >= self._TRIM_AT:
            del ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return text[len(emitted) :]


class StopChecker:
    """Per request. Finds stop strings in streamed text, even split across deltas, and never leaks them.

    The match reported is the one that completes first in the text (ties: the longer stop string), so
    the result does not depend on how the text was split into deltas. Text that could be the start of a
    stop string is held back, at most `max(len(stop)) - 1` characters. Linear time: str.find on a
    buffer of the held text plus the new delta, no regular expressions.
    After a match the checker is spent: later pushes emit nothing.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stop))  # dedupe, keep order
        self._held = ""
        self._done = False

    def push(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit now, the stop string matched or None). On a match the emitted text
        is everything before it, and the caller finishes the request."""
        if self._done:
            return "", None
        if not self._stops:
            return text, None
        buffer = self._held + text
        match = self._first_match(buffer)
        if match is not None:
            start, stop = match
            self._held, self._done = "", True
            return buffer[:start], stop
        keep = self._partial_len(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """At a finish without a match: the held-back text."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_len(self, buffer: str) -> int:
        """The length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            tail = buffer[len(buffer) - min(len(stop) - 1, len(buffer)) :] if len(stop) > 1 else ""
            i = tail.find(stop[0])
            while i >= 0 and len(tail) - i > longest:
                if stop.startswith(tail[i:]):
                    longest = len(tail) - i
                    break
                i = tail.find(stop[0], i + 1)
        return longest
