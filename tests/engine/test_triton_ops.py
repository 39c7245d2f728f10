"""The Triton kernels against the torch ops they replace: on a GPU when there is one, else on the CPU
under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.core import EngineCore
from engine.demo import DemoModel
from engine.model import ops as ops_module
from engine.model import triton_ops
from engine.model.attention import AttentionBatch
from engine.model.ops import TorchOps, TritonOps
from engine.types import SamplingParams
from tests.conftest import engine_config

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TORCH = TorchOps()
DTYPES = [torch.float32, torch.bfloat16]


def _close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    # float32: the same arithmetic. bfloat16: the interpreter truncates where torch rounds (a unit or two
    # in the last place, 2^-8 relative each); an indexing mistake is off by whole values.
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=2e-6, rtol=2e-6)
    else:
        torch.testing.assert_close(ours.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_add_rms_norm_match_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x, delta = (torch.randn(7, 96, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight = torch.randn(96, generator=g).to(DEVICE, dtype)
    _close(triton_ops.rms_norm(x, weight, 1e-6), TORCH.rms_norm(x, weight, 1e-6), dtype)
    summed, normed = triton_ops.add_rms_norm(x, delta, weight, 1e-6)
    ref_summed, ref_normed = TORCH.add_rms_norm(x, delta, weight, 1e-6)
    _close(summed, ref_summed, dtype)
    _close(normed, ref_normed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    gate_up = torch.randn(5, 2 * 1100, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    _close(triton_ops.silu_mul(gate_up), TORCH.silu_mul(gate_up), dtype)


@pytest.mark.parametrize(("dtype", "kv_heads"), [(torch.float32, 2), (torch.bfloat16, 4)])
def test_rotary_store_rotates_and_fills_the_same_slots(dtype: torch.dtype, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(3)
    heads, head_dim, tokens = 4, 16, 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    cos, sin = (torch.randn(tokens, 1, head_dim, generator=g).to(DEVICE, dtype) for _ in range(2))
    slots = torch.tensor([3, 17, 40, 41, 8, 63], device=DEVICE)
    caches = [torch.full((64, kv_heads, head_dim), 7.0, dtype=dtype, device=DEVICE) for _ in range(4)]
    q, k, v = TORCH.rotary_store(qkv, cos, sin, caches[0], caches[1], slots, heads, kv_heads)
    q2, k2, v2 = TritonOps().rotary_store(qkv, cos, sin, caches[2], caches[3], slots, heads, kv_heads)
    _close(q2, q, dtype)
    _close(k2, k, dtype)
    assert torch.equal(v2, v)
    _close(caches[2], caches[0], dtype)
    assert torch.equal(caches[3], caches[1])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert (caches[2][untouched.to(DEVICE)] == 7.0).all()


@pytest.mark.parametrize(("dtype", "heads", "kv_heads", "block_size"), [
    (torch.float32, 4, 4, 16),
    (torch.float32, 8, 2, 4),
    (torch.bfloat16, 4, 2, 16),
])  # fmt: skip
def test_paged_decode_reads_the_cache_in_place_like_the_gather(
    dtype: torch.dtype, heads: int, kv_heads: int, block_size: int
) -> None:
    g = torch.Generator().manual_seed(4)
    head_dim = 32
    lens = torch.tensor([1, 7, 70, 129, block_size * 10], device=DEVICE)
    width = -(-int(lens.max()) // block_size)
    num_blocks = 5 * width
    k_cache, v_cache = (
        torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
        for _ in range(2)
    )
    # Each row owns distinct blocks, in a scrambled order.
    tables = torch.randperm(num_blocks, generator=g).view(5, width).to(DEVICE)
    q = torch.randn(5, heads, head_dim, generator=g).to(DEVICE, dtype)
    batch = AttentionBatch(block_size, lens, None, tables, lens, True, [])
    # Without decode groups the torch ops gather everything from the cache; the rows' new k/v go unread.
    ref = TORCH.decode_attention(q, k_cache[:5], v_cache[:5], k_cache, v_cache, batch, 0)
    for keys_per_step in (64, 128, 256):  # decode_keys_for's two choices, and bench.gpu's candidate
        ours = triton_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size, keys_per_step)
        _close(ours, ref, dtype)
    # A row with nothing to attend (the padding of fixed-shape steps) gives zeros, not NaN.
    empty = triton_ops.paged_decode_attention(q[:1], k_cache, v_cache, tables[:1], lens[:1] * 0, block_size)
    assert (empty == 0).all()


def test_decode_attention_of_a_row_depends_only_on_its_own_keys() -> None:
    """Bit for bit: a row alone or among others, its block table cut to its blocks or padded wide (as in
    the fixed shapes CUDA graphs replay), so graph replays and eager steps sample the same tokens."""
    g = torch.Generator().manual_seed(5)
    block_size, heads, head_dim = 4, 2, 16
    k_cache, v_cache = (
        torch.randn(64 * block_size, heads, head_dim, generator=g).to(DEVICE) for _ in range(2)
    )
    tables = torch.randperm(64, generator=g)[:60].view(2, 30).to(DEVICE)
    lens = torch.tensor([117, 9], device=DEVICE)
    q = torch.randn(2, heads, head_dim, generator=g).to(DEVICE)
    both = triton_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size)
    wide = torch.cat([tables, tables.new_zeros(2, 50)], dim=1)
    padded = triton_ops.paged_decode_attention(q, k_cache, v_cache, wide, lens, block_size)
    alone = triton_ops.paged_decode_attention(q[:1], k_cache, v_cache, tables[:1, :30], lens[:1], block_size)
    assert torch.equal(padded, both)
    assert torch.equal(alone, both[:1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_skinny_matmul_matches_linear(dtype: torch.dtype, rows: int) -> None:
    """Every launch setting skinny_settings can pick, on inputs whose width is and is not a whole number
    of BLOCK_K (the masked tail), and output widths that leave a partial block."""
    g = torch.Generator().manual_seed(6)
    for n_out, n_in in ((40, 1024), (1000, 96), (72, 1100), (200, 96), (500, 96)):
        x = torch.randn(rows, n_in, generator=g).to(DEVICE, dtype)
        weight = torch.randn(n_out, n_in, generator=g).to(DEVICE, dtype)
        ref = (x.double() @ weight.double().t()).to(dtype)
        settings = triton_ops.skinny_settings(rows, n_out, n_in) or (32, 256, 4, 3)
        ours = triton_ops.skinny_matmul(x, weight, settings)
        assert ours.shape == (rows, n_out) and ours.dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours.float(), ref.float(), atol=tol * n_in**0.5, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_expand_matches_torch(dtype: torch.dtype) -> None:
    """y + (low, masked by each row's adapter) @ b_t, from column ranges of one wider output as the LoRA
    rows give them: unmasked, masked, and through an index where rows of other adapters lie between
    (on the GPU in bf16 the products go through the native dot, on the CPU they are widened)."""
    g = torch.Generator().manual_seed(9)

    def close(ours: torch.Tensor, ref: torch.Tensor) -> None:  # sums of `rank` products, float32 or bf16
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours.float(), ref.float(), atol=tol * rank, rtol=tol)

    for rows, n_out, rank in ((5, 96, 24), (70, 4100, 40)):
        wide = torch.randn(rows, n_out + 8 + rank, generator=g).to(DEVICE, dtype)
        y, low = wide[:, :n_out], wide[:, n_out + 8 :]
        b_t = torch.randn(rank, n_out, generator=g).to(DEVICE, dtype)
        row_adapter = torch.randint(-1, 2, (rows,), generator=g).to(DEVICE)
        owners = torch.tensor([0] * 10 + [-2] * 6 + [1] * (rank - 16), device=DEVICE)
        kept = (row_adapter[:, None] == owners[None, :]).double()
        exact = y.double() + low.double() @ b_t.double()
        close(triton_ops.lora_expand(y, low, b_t), exact)
        masked = y.double() + (low.double() * kept) @ b_t.double()
        close(triton_ops.lora_expand(y, low, b_t, row_adapter, owners), masked)
        # The same with b_t's rows 10..15 left out (the rows no adapter of the step owns).
        index = torch.tensor(list(range(10)) + [-1] * 6 + list(range(10, rank - 6)), device=DEVICE)
        packed = torch.cat([b_t[:10], b_t[16:]])
        ours = triton_ops.lora_expand(y, low, packed, row_adapter, owners, index)
        assert ours.is_contiguous()
        close(ours, masked)


def test_skinny_matmul_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight = torch.randn(1, 64).to(DEVICE), torch.randn(32, 64).to(DEVICE)
    calls: list[int] = []
    monkeypatch.setattr(triton_ops, "skinny_matmul", lambda *args: calls.append(1) or args[0] @ args[1].t())
    TritonOps().linear(x, weight)
    assert calls == [1]
    monkeypatch.setenv("CHATMED_DISABLE_SKINNY_MATMUL", "1")
    ops = TritonOps()
    torch.testing.assert_close(ops.linear(x, weight), x @ weight.t())
    assert not ops.skinny and calls == [1]


def test_linear_of_no_rows_gives_an_empty_result() -> None:
    """A step where no row samples asks the LM head for logits of zero rows."""
    out = TritonOps().linear(torch.randn(0, 64).to(DEVICE), torch.randn(1024, 64).to(DEVICE))
    assert out.shape == (0, 1024)


def test_skinny_settings_leave_batches_to_cublas_except_the_wide_lm_head() -> None:
    assert triton_ops.skinny_settings(1, 4096, 4096) is not None
    assert triton_ops.skinny_settings(1, 12288, 4096) is not None
    assert triton_ops.skinny_settings(4, 4096, 11008) is None
    assert triton_ops.skinny_settings(4, 49954, 4096) is not None
    assert triton_ops.skinny_settings(17, 49954, 4096) is None
    assert triton_ops.skinny_settings(0, 49954, 4096) is None


def test_lora_rows_keep_a_weight_in_its_skinny_setting() -> None:
    """At one row, a weight with the LoRA rows under it (at most max_loras x max_lora_rank x parts, 768
    rows for q/k/v at the defaults) is read with the setting chosen for the weight alone."""
    for n_out, n_in, extra in ((4096, 4096, 256), (4096, 11008, 256), (12288, 4096, 768), (22016, 4096, 512)):
        alone = triton_ops.skinny_settings(1, n_out, n_in)
        assert triton_ops.skinny_settings(1, n_out + extra, n_in) == alone


def test_engine_on_triton_ops_generates_what_the_torch_ops_generate(demo: DemoModel) -> None:
    """Prefill, chunked prefill and decode, both adapters and the base in one batch."""
    core = EngineCore(engine_config(demo, device=DEVICE.type, max_num_batched_tokens=24, enforce_eager=True))
    core.runner.model.ops = TorchOps()
    prompts = [
        core.tokenizer.encode(text) for text in ("问：头痛怎么办？\n答：", "问：失眠多梦，舌苔黄腻。\n答：")
    ]
    prompts.append(prompts[0][:5])
    adapters = ["chatmed-consult", None, "chatmed-tcm"]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reference = core.generate(prompts, params, adapters)
    core.runner.model.ops = TritonOps()
    fused = core.generate(prompts, params, adapters)
    assert [o.token_ids for o in fused] == [o.token_ids for o in reference]


def test_decode_attention_reads_more_positions_per_step_where_programs_are_few(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No more (sequences x heads) programs than multiprocessors: 256 positions per loop step, else 64;
    on the CPU (the interpreter) always 64, whatever a GPU of the same process has."""
    ops = TritonOps()
    assert ops.decode_keys_for(32, torch.device("cpu")) == 64
    h200 = {"cuda": 132, "cpu": 0}
    monkeypatch.setattr(ops_module, "multiprocessors", lambda device: h200[device.type])
    assert [ops.decode_keys_for(n, torch.device("cuda")) for n in (32, 132, 133, 2048)] == [256, 256, 64, 64]
    assert ops.decode_keys_for(32, torch.device("cpu")) == 64


def test_wide_decode_attention_generates_what_the_torch_ops_generate(demo: DemoModel) -> None:
    """Decode attention at 256 positions per loop step (what small batches get on a GPU), one request at a
    time through the fixed-shape decode steps, with and without an adapter: the torch ops' tokens."""
    core = EngineCore(engine_config(demo, device=DEVICE.type, enforce_eager=True))
    prompt = core.tokenizer.encode("问：头痛发热三天怎么办？\n答：")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    core.runner.model.ops = TorchOps()
    reference = [core.generate([prompt], params, [a])[0].token_ids for a in (None, "chatmed-tcm")]
    ops = TritonOps()
    ops.decode_keys_per_step = 256
    core.runner.model.ops = ops
    core.runner.use_fixed_decode(
        4, core.max_model_len, capture=DEVICE.type == "cuda", lora_units=core.lora_units
    )
    ours = [core.generate([prompt], params, [a])[0].token_ids for a in (None, "chatmed-tcm")]
    assert ours == reference
