"""The GPU benchmark script (bench/gpu.py, bench/gpu.sh), exercised on the CPU with the tiny preset so that
its first run on a GPU works: the one command end to end without any web package importable, the JSON
holding every figure, the budget's skipping, and the byte counts behind the memory floor.

No figure here is timed: the script prints speeds, these tests check what it counts and that it finishes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.gpu import (
    SHARD_BYTES,
    Budget,
    Floor,
    HFModel,
    ModelShape,
    build_model,
    check_guard,
    cublas_decode_row,
    cublas_lora_row,
    get_preset,
    guard_reference,
    guard_variants,
    lora_bytes,
    main,
    make_prompts,
    mixed,
    overlap_row,
    plan_shards,
    run_engine,
    variant_row,
)
from engine import EngineConfig, EngineCore
from engine.demo import DEMO_ADAPTERS, LORA_TARGET_MODULES

REPO = Path(__file__).resolve().parents[2]
# The GPU host has only torch, transformers and peft (and their dependencies): none of these may be needed.
WEB_PACKAGES = ("fastapi", "starlette", "uvicorn", "sse_starlette", "openai", "pydantic_settings")
TINY_ARGS = ("--preset", "tiny", "--device", "cpu")
RUN_TIMEOUT_S = 150
CpuRun = tuple[subprocess.CompletedProcess[str], Any]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu-bench")


@pytest.fixture(scope="module")
def cpu_run(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> CpuRun:
    """`bash bench/gpu.sh --preset tiny --device cpu` with every web package made unimportable."""
    blocked = tmp_path_factory.mktemp("blocked")
    for name in WEB_PACKAGES:
        (blocked / name).mkdir()
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} must not be needed')\n")
    out = workdir / "tiny.json"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(blocked),
        # One thread: the figures mean nothing on the CPU, and spinning OpenMP threads slow shared cores.
        "OMP_NUM_THREADS": "1",
    }
    command = ["bash", "bench/gpu.sh", *TINY_ARGS, "--workdir", str(workdir), "--json", str(out)]
    proc = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text(encoding="utf-8"))


def _row(result: Any, system: str, setup: str, batch: int) -> dict[str, Any]:
    matches = [r for r in result["rows"] if (r["system"], r["setup"], r["batch"]) == (system, setup, batch)]
    assert len(matches) == 1, f"no single row for {system}, {setup}, batch {batch}"
    return matches[0]


def test_cpu_run_reports_every_figure(cpu_run: CpuRun) -> None:
    proc, result = cpu_run
    preset = get_preset("tiny")
    assert result["copy_bandwidth_gbs"] > 0
    assert result["model"]["parameters"] == preset.shape.num_parameters()
    assert [p["skipped"] for p in result["phases"]] == [None] * len(result["phases"])
    ours = [("base", 1), ("chatmed-tcm", 1)]
    ours += [(setup, c) for c in preset.concurrency for setup in ("mixed 50/50", "base")]
    theirs = [("base", 1), ("chatmed-tcm", 1), ("base", preset.hf_batch), ("mixed 50/50", preset.hf_batch)]
    rows = [_row(result, "chatmed engine", s, b) for s, b in ours]
    rows += [_row(result, "transformers generate", s, b) for s, b in theirs]
    assert len(result["rows"]) == len(rows)
    for row in rows:
        assert not row["partial"]
        for key in ("seconds", "out_tok_s", "step_ms", "floor_ms", "x_floor"):
            assert row[key] is not None and row[key] > 0, (row, key)
        if row["system"] == "chatmed engine":
            assert row["vs_transformers"] is not None and row["vs_transformers"] > 0, row
    # Whole runs produce exactly max_tokens per request; decode rows count their timed steps.
    for row in rows[2:]:
        assert row["output_tokens"] == row["batch"] * preset.max_tokens, row
    assert rows[0]["output_tokens"] == preset.decode_steps
    # Each timed step's model part is inside that step, so the medians keep that order.
    for row in rows[:2]:
        assert 0 < row["forward_ms"] <= row["step_ms"], row
    assert all(row["forward_ms"] is None for row in rows[2:])
    # A step of 4 sequences reads the same weights as one, plus more cached keys and embedding rows.
    batch_4 = _row(result, "chatmed engine", "base", 4)["floor_ms"]
    assert rows[0]["floor_ms"] < batch_4 < 2 * rows[0]["floor_ms"]
    assert set(result["mixed_over_base"]) == {str(c) for c in preset.concurrency}
    # The profiled decode steps: the model's matmuls among the operators that take the time.
    profile = result["decode_profile"]
    assert profile and all(op["ms_per_step"] > 0 and op["calls_per_step"] > 0 for op in profile)
    assert any("mm" in op["name"] or "linear" in op["name"] for op in profile)
    assert "by self CPU time" in proc.stdout
    assert "vs transformers" in proc.stdout and "chatmed engine" in proc.stdout


def test_cpu_run_guard_matches_transformers(cpu_run: CpuRun) -> None:
    proc, result = cpu_run
    guard = result["guard"]
    assert guard["passed"] is True
    # float32 on the CPU: our engine and transformers + peft agree to rounding, token for token.
    assert guard["max_logprob_diff"] < 1e-3 and guard["max_flip_gap"] == 0.0
    assert guard["greedy_match"] == {"base": "8/8", "chatmed-consult": "8/8", "chatmed-tcm": "8/8"}
    # The adapters move the logits far more than the tolerance, so a dropped adapter would fail.
    assert guard["adapter_effect"] > 50 * guard["atol"]
    assert "guard: PASSED" in proc.stdout


def test_checkpoint_is_cached_and_budget_skips_say_so(
    cpu_run: CpuRun, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rerun reuses the folder the first run wrote; with no time left every phase but the build is
    skipped, named in the table's footer and the JSON, and the run still ends cleanly."""
    folders = sorted(p.name for p in workdir.glob("llama-*"))
    assert len(folders) == 1
    out = workdir / "skipped.json"
    code = main([*TINY_ARGS, "--workdir", str(workdir), "--json", str(out), "--budget-s", "0"])
    assert code == 0
    assert sorted(p.name for p in workdir.glob("llama-*")) == folders
    result = json.loads(out.read_text(encoding="utf-8"))
    phases = {p["name"]: p["skipped"] for p in result["phases"]}
    assert phases.pop("build") is None
    assert {"copy bandwidth", "transformers load", "engine load"} <= set(phases)
    assert all(reason for reason in phases.values())
    assert result["rows"] == [] and result["guard"] is None and result["copy_bandwidth_gbs"] is None
    stdout = capsys.readouterr().out
    assert "skipped: engine load" in stdout and "guard: not run" in stdout


def test_cuda_preset_without_cuda_exits_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["--preset", "7b", "--budget-s", "1"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_sharded_checkpoint_loads_in_transformers_and_the_engine(tmp_path: Path) -> None:
    """The 7B checkpoint is written in seven shards with an index; the same layout at a small scale
    loads in transformers + peft and in our engine, which agree on it."""
    shape = get_preset("tiny").shape
    built = build_model(shape, "float32", torch.device("cpu"), tmp_path, seed=5, shard_bytes=256 * 1024)
    index = json.loads((built.base_path / "model.safetensors.index.json").read_text())
    files = sorted(built.base_path.glob("model-*.safetensors"))
    assert len(files) > 3 and set(index["weight_map"].values()) == {f.name for f in files}
    assert sorted(index["weight_map"]) == sorted(name for name, _ in shape.tensors())
    assert index["metadata"]["total_size"] == shape.num_parameters() * 4
    config = json.loads((built.base_path / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"]) == (shape.vocab_size, shape.num_layers)
    for name, path in built.adapters:
        adapter = json.loads((path / "adapter_config.json").read_text())
        assert adapter["r"] == dict(DEMO_ADAPTERS)[name]
        assert sorted(adapter["target_modules"]) == sorted(LORA_TARGET_MODULES)
    hf = HFModel(built, torch.device("cpu"), torch.float32)
    variants = guard_variants(built)
    ref = guard_reference(hf, [1, 5, 9, 200, 4000, 17], variants, num_tokens=4)
    hf.close()
    core = EngineCore(EngineConfig(model_path=built.base_path, adapters=built.adapters, num_kv_blocks=32))
    guard = check_guard(core, ref, variants, atol=1e-3)
    assert guard.passed, guard


def test_kernel_variant_rows_run_and_give_the_engine_back(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows that time the Triton ops' variants (cuBLAS matmuls, cuBLAS LoRA, the batch-1 candidates)
    run on their own fresh fixed-shape graphs (here, on the CPU, under Triton's interpreter, without
    capture) and leave the engine's settings and graphs as they were."""
    pytest.importorskip("triton")
    from engine.model.ops import TritonOps

    shape = get_preset("tiny").shape
    built = build_model(shape, "float32", torch.device("cpu"), workdir, seed=0)
    config = EngineConfig(
        model_path=built.base_path, adapters=built.adapters, num_kv_blocks=64, overlap_steps=False
    )
    core = EngineCore(config)  # plain steps, as bench.gpu's engine
    core.runner.model.ops = ops = TritonOps()
    core.runner.use_fixed_decode(8, core.max_model_len, capture=False, lora_units=core.lora_units)
    graphs = core.runner.graphs
    floor = Floor(shape, 4, 10.0, dict(DEMO_ADAPTERS))
    prompts = make_prompts(4, 12, 4000, seed=1)
    works = mixed(prompts, [name for name, _ in DEMO_ADAPTERS])
    deadline = math.inf
    from engine.model import triton_ops

    calls = {"skinny": 0, "expand": 0}
    for name, key in (("skinny_matmul", "skinny"), ("lora_expand", "expand")):
        original = getattr(triton_ops, name)

        def counted(*args: Any, _original: Any = original, _key: str = key, **kwargs: Any) -> Any:
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_ops, name, counted)
    rows = [cublas_decode_row(core, works[0], 4, floor, deadline)]
    assert calls["skinny"] == 0 and calls["expand"] > 0  # every matmul on torch, the LoRA rows kept
    calls.update(skinny=0, expand=0)
    rows.append(cublas_lora_row(core, works[1:2], "chatmed-tcm", 4, floor, deadline))
    rows.append(cublas_lora_row(core, works, "mixed 50/50", 4, floor, deadline))
    assert calls["skinny"] > 0 and calls["expand"] == 0  # the LoRA by torch matmuls
    assert [r.setup for r in rows] == [
        "chatmed-consult, cuBLAS matmuls",
        "chatmed-tcm, cuBLAS LoRA",
        "mixed 50/50, cuBLAS LoRA",
    ]
    assert [r.batch for r in rows] == [1, 1, 4]
    assert all(r.output_tokens > 0 and r.step_ms > 0 for r in rows)
    assert ops.skinny and ops.lora_rows and core.runner.graphs is graphs
    run_engine(core, works, 4, deadline, "rows")  # the engine's own graphs again: the LoRA rows
    assert calls["expand"] > 0
    row = variant_row(core, works[:1], "base, candidates", 4, floor, deadline, decode_keys_per_step=128)
    assert row.setup == "base, candidates" and row.output_tokens > 0
    assert ops.decode_keys_per_step is None and core.runner.graphs is graphs
    assert core.allocator.num_free == core.allocator.num_blocks


def test_overlap_rows_overlap_steps_and_give_the_engine_back(workdir: Path) -> None:
    """The `overlapped steps` rows (on the CPU: fixed-shape steps without capture) run with the engine's
    overlap on (their ChatMed-sampling twin without), at batch 1 without the forward timer, and leave it
    as it was: off, as bench.gpu's engine has it. ChatMed's sampling (top-p) reads its step back anyway,
    so its steps are not overlapped even with overlap on."""
    shape = get_preset("tiny").shape
    built = build_model(shape, "float32", torch.device("cpu"), workdir, seed=0)
    config = EngineConfig(
        model_path=built.base_path, adapters=built.adapters, num_kv_blocks=64, overlap_steps=False
    )
    core = EngineCore(config)
    core.runner.use_fixed_decode(8, core.max_model_len, capture=False, lora_units=core.lora_units)
    floor = Floor(shape, 4, 10.0, dict(DEMO_ADAPTERS))
    works = mixed(make_prompts(4, 12, 4000, seed=1), [name for name, _ in DEMO_ADAPTERS])
    one = overlap_row(core, works[:1], "base, overlapped steps", 6, floor, math.inf)
    overlapped = core.num_overlapped
    four = overlap_row(core, works, "mixed 50/50, overlapped steps", 6, floor, math.inf)
    assert (one.batch, one.output_tokens, four.batch, four.output_tokens) == (1, 6, 4, 24)
    assert one.step_ms > 0 and math.isnan(one.forward_ms) and four.out_tok_s > 0
    assert 0 < overlapped < core.num_overlapped
    before = core.num_overlapped
    plain = overlap_row(core, works[:1], "base, ChatMed sampling", 6, floor, math.inf, False, True)
    assert core.num_overlapped == before and plain.output_tokens == 6
    sampled = overlap_row(core, works[:1], "sampled, overlapped", 6, floor, math.inf, True, True)
    assert core.num_overlapped == before and sampled.output_tokens == 6
    assert not core.overlap and not core.has_unfinished()
    assert core.allocator.num_free == core.allocator.num_blocks


def test_shard_plan_keeps_order_and_limit() -> None:
    tensors = [("a", (10,)), ("b", (30,)), ("c", (100,)), ("d", (5,)), ("e", (5,))]
    assert [[n for n, _ in s] for s in plan_shards(tensors, 1, 40)] == [["a", "b"], ["c"], ["d", "e"]]
    shards = plan_shards(get_preset("7b").shape.tensors(), 2, SHARD_BYTES)
    assert len(shards) == 7  # 13.8 GB in shards of at most 2 GiB
    assert [n for s in shards for n, _ in s] == [n for n, _ in get_preset("7b").shape.tensors()]


# ---- the figures behind the memory floor -----------------------------------------------------------------


def test_parameter_count_is_llama_7b() -> None:
    llama_7b = ModelShape(4096, 32, 32, 32, 11008, vocab_size=32000)
    assert llama_7b.num_parameters() == 6_738_415_616  # Meta's LLaMA-7B, untied lm_head
    chatmed = get_preset("7b").shape
    assert chatmed.vocab_size == 49954
    assert chatmed.num_parameters() == 6_738_415_616 + 2 * (49954 - 32000) * 4096


def test_decode_read_bytes_counts_layers_lm_head_rows_and_kv() -> None:
    shape = get_preset("7b").shape
    embedding = shape.vocab_size * shape.hidden_size
    weights = (shape.num_parameters() - embedding) * 2
    assert shape.decode_read_bytes(2, num_seqs=1, mean_context=0) == weights + shape.hidden_size * 2
    kv_per_token = 2 * 32 * 32 * 128 * 2  # K and V, 32 layers, 32 heads of 128, bf16: 512 KiB
    assert shape.kv_bytes_per_token(2) == kv_per_token == 512 * 1024
    with_kv = shape.decode_read_bytes(2, num_seqs=4, mean_context=100)
    assert with_kv == weights + 4 * shape.hidden_size * 2 + 4 * 100 * kv_per_token
    assert 13.3e9 < weights < 13.5e9


def test_lora_bytes_match_the_published_adapters() -> None:
    """CHATMED.md: ChatMed-Consult (r=8) is about 80 MB and ShenNong-TCM (r=16) about 160 MB, in float32."""
    shape = get_preset("7b").shape
    assert lora_bytes(shape, 8, 4) == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008)) * 4
    assert 75e6 < lora_bytes(shape, 8, 4) < 85e6
    assert lora_bytes(shape, 16, 4) == 2 * lora_bytes(shape, 8, 4)


def test_prompts_are_seeded_ordinary_ids_of_varied_length() -> None:
    prompts = make_prompts(64, 100, 4501, seed=3)
    assert prompts == make_prompts(64, 100, 4501, seed=3)
    assert prompts != make_prompts(64, 100, 4501, seed=4)
    assert all(p[0] == 1 and 90 <= len(p) <= 110 for p in prompts)
    assert all(3 <= t < 4500 for p in prompts for t in p[1:])
    assert len({len(p) for p in prompts}) > 1  # transformers' batch really pads
    works = mixed(prompts[:4], ["chatmed-consult", "chatmed-tcm"])
    assert [w.adapter for w in works] == ["chatmed-consult", "chatmed-tcm"] * 2


def test_budget_runs_what_fits_and_records_what_it_skips() -> None:
    budget = Budget(budget_s=60.0)
    assert budget.run("fits", lambda: 7, estimate_s=1.0) == 7
    assert budget.run("too long", lambda: 8, estimate_s=100.0) is None
    assert budget.run("reserve eats it", lambda: 9, estimate_s=10.0, reserve_s=55.0) is None
    assert budget.run_always("needed", lambda: 10) == 10
    assert [(p.name, p.skipped is None) for p in budget.phases] == [
        ("fits", True),
        ("too long", False),
        ("reserve eats it", False),
        ("needed", True),
    ]
    assert math.isfinite(budget.left_s) and budget.left_s <= 60.0


# ---- on a GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_preset_on_cuda_in_bf16(tmp_path: Path) -> None:
    """The same path on the GPU in bf16 (the 7B run is `bash bench/gpu.sh`, minutes long)."""
    out = tmp_path / "cuda.json"
    args = ["--preset", "tiny", "--device", "cuda", "--dtype", "bfloat16", "--guard-atol", "0.05"]
    assert main([*args, "--workdir", str(tmp_path), "--json", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["guard"]["passed"] is True
    assert result["copy_bandwidth_gbs"] > 0
    assert all(r["out_tok_s"] > 0 and not r["partial"] for r in result["rows"])
    # With the Triton ops and CUDA graphs every variant row is there: 10 at batch 1, 6 per concurrency.
    ours = [(r["setup"], r["batch"]) for r in result["rows"] if r["system"] == "chatmed engine"]
    assert {s for s, b in ours if b == 1} >= {
        "base",
        "chatmed-tcm",
        "base, overlapped steps",
        "base, ChatMed sampling, overlapped steps",
        "base, no CUDA graphs",
        "base, cuBLAS matmuls",
        "base, attention 64 keys/step",
    }
    for c in result["config"]["concurrency"]:
        assert {s for s, b in ours if b == c} == {
            "mixed 50/50",
            "base",
            "mixed 50/50, overlapped steps",
            "base, overlapped steps",
            "mixed 50/50, cuBLAS LoRA",
            "base, attention 256 keys/step",
        }
    assert len(ours) == 10 + 6 * len(result["config"]["concurrency"])
    assert sum(r["system"] == "transformers generate" for r in result["rows"]) == 4
