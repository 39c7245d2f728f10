"""Wire models, request checks, sampling defaults and settings, without an engine."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engine.demo import DemoModel
from engine.errors import InvalidRequest, PromptTooLong
from server.__main__ import engine_config
from server.errors import validation_param
from server.generation import check_chat_request, check_completion_request, sampling_params
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.registry import CHATMED_DEFAULTS, PLAIN_DEFAULTS
from server.settings import Settings, parse_adapter

MESSAGES = [{"role": "user", "content": "头痛怎么办？"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "问", **fields})


# ---- defaults and explicit values ---------------------------------------------------------------------


def test_chatmed_defaults_fill_what_the_request_leaves_out() -> None:
    (params,) = sampling_params(chat(), CHATMED_DEFAULTS, num_prompt_tokens=20, max_model_len=2048)
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.2, 0.9, 1.3)
    assert params.max_tokens == 400


def test_explicit_values_win_even_when_they_equal_openai_defaults() -> None:
    request = chat(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_tokens=7)
    (params,) = sampling_params(request, CHATMED_DEFAULTS, num_prompt_tokens=20, max_model_len=2048)
    assert (params.temperature, params.top_p, params.repetition_penalty) == (1.0, 1.0, 1.0)
    assert params.max_tokens == 7


def test_explicit_zero_temperature_is_kept() -> None:
    (params,) = sampling_params(chat(temperature=0), CHATMED_DEFAULTS, 20, 2048)
    assert params.temperature == 0.0 and params.greedy


def test_null_means_not_given() -> None:
    (params,) = sampling_params(chat(temperature=None, max_tokens=None), CHATMED_DEFAULTS, 20, 2048)
    assert params.temperature == 0.2 and params.max_tokens == 400


def test_default_max_tokens_is_capped_to_the_room_left() -> None:
    (params,) = sampling_params(chat(), CHATMED_DEFAULTS, num_prompt_tokens=200, max_model_len=256)
    assert params.max_tokens == 56


def test_plain_defaults_fill_the_context() -> None:
    (params,) = sampling_params(completion(), PLAIN_DEFAULTS, num_prompt_tokens=6, max_model_len=256)
    assert (params.temperature, params.top_p, params.repetition_penalty) == (1.0, 1.0, 1.0)
    assert params.max_tokens == 250


def test_a_prompt_that_fills_the_context_is_refused() -> None:
    with pytest.raises(PromptTooLong) as info:
        sampling_params(chat(), CHATMED_DEFAULTS, num_prompt_tokens=256, max_model_len=256)
    assert info.value.param == "messages"


def test_explicit_max_tokens_is_left_for_the_engine_to_check() -> None:
    (params,) = sampling_params(chat(max_tokens=1000), CHATMED_DEFAULTS, 200, 256)
    assert params.max_tokens == 1000


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    (params,) = sampling_params(chat(max_tokens=9, max_completion_tokens=5), CHATMED_DEFAULTS, 20, 2048)
    assert params.max_tokens == 5


def test_n_choices_get_consecutive_seeds() -> None:
    params = sampling_params(chat(n=3, seed=41), CHATMED_DEFAULTS, 20, 2048)
    assert [p.seed for p in params] == [41, 42, 43]
    assert [p.seed for p in sampling_params(chat(n=2), CHATMED_DEFAULTS, 20, 2048)] == [None, None]


def test_stop_and_extensions_reach_the_engine() -> None:
    request = chat(stop="。", top_k=5, min_tokens=2, ignore_eos=True, presence_penalty=0.5)
    (params,) = sampling_params(request, CHATMED_DEFAULTS, 20, 2048)
    assert params.stop == ("。",)
    assert (params.top_k, params.min_tokens, params.ignore_eos, params.presence_penalty) == (5, 2, True, 0.5)
    (params,) = sampling_params(chat(stop=["a", "b"]), CHATMED_DEFAULTS, 20, 2048)
    assert params.stop == ("a", "b")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({}, None), ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 3}, 3)],
)
def test_chat_logprobs(fields: dict[str, Any], expected: int | None) -> None:
    (params,) = sampling_params(chat(**fields), CHATMED_DEFAULTS, 20, 2048)
    assert params.logprobs == expected


def test_completion_logprobs_is_an_integer() -> None:
    (params,) = sampling_params(completion(logprobs=2), CHATMED_DEFAULTS, 20, 2048)
    assert params.logprobs == 2


# ---- what is refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"42": 5.0}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"n": 9}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_unsupported_chat_parameters_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_chat_request(chat(**fields), max_n=8)
    assert info.value.param == param


def test_neutral_values_of_unsupported_parameters_are_accepted() -> None:
    request = chat(tools=[], tool_choice="none", response_format={"type": "text"}, logit_bias={}, n=8)
    check_chat_request(request, max_n=8)


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"echo": True}, "echo"), ({"suffix": "后"}, "suffix"), ({"best_of": 3, "n": 2}, "best_of")],
)
def test_unsupported_completion_parameters_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_completion_request(completion(**fields), max_n=8)
    assert info.value.param == param


def test_best_of_equal_to_n_is_accepted() -> None:
    check_completion_request(completion(best_of=2, n=2), max_n=8)


# ---- wire models --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"n": "2"},
        {"n": True},
        {"n": 0},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": 2.5},
        {"top_p": 0},
        {"max_tokens": 0},
        {"messages": []},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": "\ud800"}]},
        {"stop": 5},
        {"seed": -1},
    ],
)
def test_bad_chat_fields_fail_validation(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        chat(**fields)


def test_unknown_fields_are_ignored_and_text_parts_joined() -> None:
    request = chat(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "头痛"}, {"type": "text", "text": "三天"}]}
        ],
        some_future_field={"x": 1},
    )
    assert request.messages[0].text() == "头痛\n三天"


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "n"), "n"),
        (("body", "stop", "list[str]", 0), "stop[0]"),
        (("body", "messages", 0, "content", "str"), "messages[0].content"),
        (("body", "messages", 1, "content", "list[TextPart]", 0, "text"), "messages[1].content[0].text"),
        (("body",), None),
        (("body", 12), "[12]"),
    ],
)
def test_validation_param_names_the_field(loc: tuple[Any, ...], param: str | None) -> None:
    assert validation_param(loc) == param


# ---- settings -----------------------------------------------------------------------------------------


def test_settings_cli_beats_env_beats_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATMED_PORT", "9001")
    monkeypatch.setenv("CHATMED_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("CHATMED_ADAPTER", "a=/x, b=/y")
    settings = Settings.from_args(["--port", "9002", "--kv-cache-memory-mb", "64"])
    assert settings.port == 9002  # flag over env
    assert settings.max_num_seqs == 7  # env over default
    assert settings.host == "127.0.0.1"  # default
    assert settings.adapter_paths() == (("a", Path("/x")), ("b", Path("/y")))
    config = settings.engine_config(Path("/base"), settings.adapter_paths())
    assert config.kv_cache_bytes == 64 * 1024**2 and config.max_num_seqs == 7
    assert not config.enforce_eager
    assert Settings.from_args(["--enforce-eager"]).engine_config(Path("/base"), ()).enforce_eager
    assert config.overlap_steps  # on CUDA: measured faster (engine.config)
    assert not Settings.from_args(["--no-overlap-steps"]).engine_config(Path("/base"), ()).overlap_steps
    assert config.dtype == "auto"  # the engine picks the device's fast dtype
    assert Settings.from_args(["--dtype", "float32"]).engine_config(Path("/base"), ()).dtype == "float32"


def test_cpu_threads_default_to_every_core_but_the_event_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    config = Settings.from_args([]).engine_config(Path("/base"), ())
    assert (config.num_threads, config.prefill_threads) == (3, 4)  # prompts on every core
    config = Settings.from_args(["--prefill-threads", "2"]).engine_config(Path("/base"), ())
    assert (config.num_threads, config.prefill_threads) == (3, 2)
    assert Settings.from_args(["--device", "cuda"]).engine_config(Path("/base"), ()).prefill_threads is None
    # An explicit --num-threads bounds every step unless --prefill-threads says otherwise.
    config = Settings.from_args(["--num-threads", "1"]).engine_config(Path("/base"), ())
    assert (config.num_threads, config.prefill_threads) == (1, None)
    config = Settings.from_args(["--num-threads", "1", "--prefill-threads", "3"]).engine_config(
        Path("/base"), ()
    )
    assert (config.num_threads, config.prefill_threads) == (1, 3)
    assert Settings.from_args(["--num-threads", "4"]).engine_config(Path("/base"), ()).num_threads == 4
    assert Settings.from_args(["--device", "cuda"]).engine_config(Path("/base"), ()).num_threads is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert Settings.from_args([]).engine_config(Path("/base"), ()).num_threads == 1


def test_settings_repeatable_adapter_flag() -> None:
    settings = Settings.from_args(["--adapter", "c=/m/c", "--adapter", "t=/m/t", "--api-key", "sk-secret-42"])
    assert [name for name, _ in settings.adapter_paths()] == ["c", "t"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "sk-secret-42"
    assert "sk-secret-42" not in repr(settings)  # the key never shows in logs of the settings


@pytest.mark.parametrize("spec", ["noequals", "=/path", "name=", "a/b=/p"])
def test_bad_adapter_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_adapter(spec)


def test_duplicate_adapter_names_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(adapter=["a=/x", "a=/y"])


def test_main_serves_the_demo_when_no_base_is_given(
    demo: DemoModel, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = demo.base_path.parent.parent
    settings = Settings(demo_size="tiny", cache_dir=cache_dir, adapter=["extra=/adapters/extra"])
    with caplog.at_level(logging.WARNING):
        config = engine_config(settings)
    assert config.model_path == demo.base_path
    assert dict(config.adapters) == {**demo.adapters, "extra": Path("/adapters/extra")}
    assert "random noise" in caplog.text and "--base-model" in caplog.text


def test_main_serves_the_given_base_and_adapters(tmp_path: Path) -> None:
    settings = Settings.from_args(["--base-model", str(tmp_path), "--adapter", f"chatmed-tcm={tmp_path}/tcm"])
    config = engine_config(settings)
    assert config.model_path == tmp_path
    assert config.adapters == (("chatmed-tcm", tmp_path / "tcm"),)
