"""The embedded demo builder: deterministic, reused, loadable by transformers and peft, and a tokenizer that
gives any text back exactly."""

from __future__ import annotations

import itertools
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine import demo as demo_module
from engine.demo import LORA_TARGET_MODULES, DemoModel, DemoSpec, build_demo, default_cache_dir, make_adapter

# peft reads an attribute that transformers 5 deprecates when it wraps a model; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

SPECIAL_TEXTS = ("<s>", "</s>", "<unk>", "<pad>")
CHATMED_PROMPTS = [
    "<s>问：\n我头痛怎么办？\n答：\n",
    "<s>问：\n宝宝发烧咳嗽，需要吃药吗\n答：\n",
    "<s>问：\n失眠多梦，舌苔白腻，怎么调理\n答：\n",
    "<s>问：\n高血压患者可以吃什么\n答：\n",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    return build_demo(DemoSpec.tiny(), cache_dir=tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def tokenizer(built: DemoModel) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(built.base_path)


def _base_model(demo: DemoModel) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(demo.base_path, dtype=torch.float32).eval()


def _last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob(pattern))}


# --- the build: layout, determinism, reuse, failures ---


def test_layout_is_one_folder_per_spec(built: DemoModel) -> None:
    folder = built.base_path.parent
    assert folder.name == f"demo-{DemoSpec.tiny().key}"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (built.base_path / name).is_file(), name
    assert (built.base_path / "special_tokens_map.json").is_file()
    assert sorted(built.adapters) == ["chatmed-consult", "chatmed-tcm"]
    for path in built.adapters.values():
        assert path == folder / "adapters" / path.name
        assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def test_build_is_deterministic_quiet_and_leaves_global_rng_alone(
    built: DemoModel, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    torch.manual_seed(1234)
    expected_draw = torch.rand(4)
    torch.manual_seed(1234)
    with caplog.at_level(logging.INFO, logger="engine.demo"):
        again = build_demo(DemoSpec.tiny(), cache_dir=tmp_path)
    assert torch.equal(torch.rand(4), expected_draw)
    assert capfd.readouterr() == ("", "")
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "building demo model" in caplog.records[0].getMessage()

    first, second = built.base_path.parent, again.base_path.parent
    assert first.name == second.name
    weights = _files(first, "*.safetensors")
    assert len(weights) == 3 and weights == _files(second, "*.safetensors")
    assert _files(first, "*.json").keys() == _files(second, "*.json").keys()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (first / "base" / name).read_bytes() == (second / "base" / name).read_bytes(), name


def test_existing_folder_is_reused_without_touching_torch(
    built: DemoModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    weights = built.base_path / "model.safetensors"
    before = weights.stat()
    for module in ("torch", "transformers", "peft", "tokenizers"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of them now raises ImportError
    with caplog.at_level(logging.INFO, logger="engine.demo"):
        again = build_demo(DemoSpec.tiny(), cache_dir=built.base_path.parent.parent)
    assert again == built
    assert caplog.records == []
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_failed_build_leaves_nothing_and_the_next_build_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_adapter(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(demo_module, "make_adapter", broken_adapter)
        with pytest.raises(RuntimeError, match="disk full"):
            build_demo(DemoSpec.tiny(), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    model = build_demo(DemoSpec.tiny(), cache_dir=tmp_path)
    assert (model.adapters["chatmed-tcm"] / "adapter_model.safetensors").is_file()


def test_losing_a_concurrent_build_returns_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build_into = demo_module._build_into
    races = iter([True])  # only the outer build races; the inner one is the "other process"

    def build_into_then_lose_the_race(folder: Path, final: Path, spec: DemoSpec) -> None:
        real_build_into(folder, final, spec)
        if next(races, False):
            build_demo(spec, cache_dir=tmp_path)  # finishes first and takes the final name

    monkeypatch.setattr(demo_module, "_build_into", build_into_then_lose_the_race)
    model = build_demo(DemoSpec.tiny(), cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [model.base_path.parent.name]
    assert (model.base_path / "model.safetensors").is_file()


def test_spec_key_changes_with_the_spec() -> None:
    spec = DemoSpec()
    assert len(spec.key) == 12 and int(spec.key, 16) >= 0
    assert DemoSpec().key == spec.key
    variants = [DemoSpec(seed=1), DemoSpec(num_layers=3), DemoSpec(rope_theta=5e5), DemoSpec.tiny()]
    assert len({spec.key, *(v.key for v in variants)}) == 1 + len(variants)


@pytest.mark.parametrize(
    "fields",
    [{"num_heads": 3}, {"num_kv_heads": 3}, {"hidden_size": 0}, {"hidden_size": 24, "num_heads": 8}],
)
def test_bad_specs_are_refused(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        DemoSpec(**fields)  # type: ignore[arg-type]


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATMED_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CHATMED_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "chatmed-serve"


# --- the base model ---


def test_base_loads_with_transformers_and_matches_the_tokenizer(
    built: DemoModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = _base_model(built)
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == DemoSpec.tiny().num_parameters()


def test_bench_spec_is_about_twenty_million_parameters() -> None:
    assert 18e6 <= DemoSpec.bench().num_parameters() <= 22e6


@pytest.mark.parametrize("spec", [DemoSpec.tiny(), DemoSpec()], ids=["tiny", "default"])
def test_greedy_decoding_varies_and_depends_on_context(
    spec: DemoSpec, tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = _base_model(build_demo(spec, cache_dir=tmp_path))
    batch = tokenizer(
        CHATMED_PROMPTS, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
    )
    with torch.no_grad():  # min_new_tokens keeps an early EOS from cutting a sample short
        out = model.generate(**batch, do_sample=False, max_new_tokens=24, min_new_tokens=24)  # type: ignore[operator]
    continuations = out[:, batch["input_ids"].shape[1] :].tolist()
    for tokens in continuations:
        assert len(set(tokens)) >= 8, tokens
        assert max(len(list(run)) for _, run in itertools.groupby(tokens)) <= 4, tokens
    # All prompts end in the same tokens ("答：\n"), so differing first tokens come from the context.
    assert len({tokens[0] for tokens in continuations}) >= 2


# --- the adapters ---


@pytest.mark.parametrize(("name", "rank"), [("chatmed-consult", 8), ("chatmed-tcm", 16)])
def test_adapter_configs_are_chatmeds(built: DemoModel, name: str, rank: int) -> None:
    config = PeftConfig.from_pretrained(str(built.adapters[name]))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (rank, 32, 0.1)
    assert set(config.target_modules) == set(LORA_TARGET_MODULES)
    assert config.task_type == "CAUSAL_LM"
    assert config.base_model_name_or_path == str(built.base_path)


def test_adapters_change_logits_and_differ_from_each_other(
    built: DemoModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = tokenizer(CHATMED_PROMPTS[0], add_special_tokens=False)["input_ids"]
    base = _last_logits(_base_model(built), ids)
    adapted = {
        name: _last_logits(PeftModel.from_pretrained(_base_model(built), path).eval(), ids)
        for name, path in built.adapters.items()
    }
    for logits in (base, *adapted.values()):
        assert torch.isfinite(logits).all()
        assert 0.5 < logits.std().item() < 10  # sane: neither flat nor saturated
    for name, logits in adapted.items():
        assert (logits - base).abs().max().item() > 0.1, name
    assert (adapted["chatmed-consult"] - adapted["chatmed-tcm"]).abs().max().item() > 0.1


@pytest.mark.parametrize(
    ("rank", "modules", "rslora", "safe"),
    [(4, ("q_proj", "v_proj"), False, False), (32, LORA_TARGET_MODULES, True, True)],
)
def test_make_adapter_variants_load_in_peft(
    built: DemoModel, tmp_path: Path, rank: int, modules: tuple[str, ...], rslora: bool, safe: bool
) -> None:
    out = make_adapter(
        built.base_path,
        tmp_path / "extra",
        r=rank,
        lora_alpha=16,
        target_modules=modules,
        seed=7,
        use_rslora=rslora,
        safe_serialization=safe,
    )
    weights = out / ("adapter_model.safetensors" if safe else "adapter_model.bin")
    assert weights.is_file() and len(list(out.glob("adapter_model.*"))) == 1
    if not safe:
        state = torch.load(weights, weights_only=True)
        assert {key.split(".")[-3] for key in state} == set(modules)
        assert all(min(t.shape) == rank for t in state.values())
    config = PeftConfig.from_pretrained(str(out))
    assert (config.r, config.use_rslora, set(config.target_modules)) == (rank, rslora, set(modules))
    ids = [1, 400, 500, 600]
    base = _last_logits(_base_model(built), ids)
    adapted = _last_logits(PeftModel.from_pretrained(_base_model(built), out).eval(), ids)
    assert (adapted - base).abs().max().item() > 0.1


# --- the tokenizer ---


def test_special_and_byte_token_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == len(tokenizer) - 1
    assert tokenizer.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]
    assert 4000 <= len(tokenizer) <= 8000


def test_default_encoding_adds_exactly_one_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("问：\n头痛\n答：\n")
    assert ids[0] == 1 and ids.count(1) == 1
    assert tokenizer("Hello doctor")["input_ids"][0] == 1


def test_bos_written_in_the_prompt_is_one_token(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "<s>问：\n头痛\n答：\n我也不知道</s>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids[-1] == 2 and ids.count(2) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "问：\n头痛\n答：\n我也不知道"


def test_hanzi_outside_the_vocab_fall_back_to_utf8_bytes(tokenizer: PreTrainedTokenizerBase) -> None:
    vocab = tokenizer.get_vocab()
    assert all(c in vocab for c in "问答医生病症状治疗药中")
    rare = next(chr(c) for c in range(0x4E00, 0x9FA6) if chr(c) not in vocab)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(f"医{rare}", add_special_tokens=False)["input_ids"])
    assert pieces == ["▁", "医", *(f"<0x{b:02X}>" for b in rare.encode())]
    assert len(pieces) == 5


_TEXT_PIECES = st.one_of(
    st.characters(codec="utf-8", exclude_characters="▁"),  # any encodable code point but SentencePiece's ▁
    st.sampled_from("问答医生病症状治疗药中等，。 \n"),
    st.sampled_from(["the", " patient", "ing", "😀", "\t", "  ", "\r\n"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TEXT_PIECES, max_size=30).map("".join))
@example("我头痛，吃什么药？")
@example("Hello world,  the patient's  fever")
@example("  leading and trailing  ")
@example("混合 text 和中文 😀 emoji\n\n新的一行\r\n")
@example("")
def test_decode_of_encode_gives_the_text_back(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    assume(not any(special in text for special in SPECIAL_TEXTS))  # those are matched in text by design
    for add_special_tokens in (True, False):
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_config_declares_the_special_tokens(built: DemoModel) -> None:
    config = json.loads((built.base_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
