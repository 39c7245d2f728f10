"""The model's small operations, in two interchangeable sets: plain torch (the CPU, and CUDA without
Triton) and Triton kernels (CUDA), which fuse each into one launch and read the KV cache in place.

Both sets compute the same function with the same roundings; the test suite checks the Triton set
against the torch set (under Triton's interpreter when there is no GPU).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from engine.model.attention import AttentionBatch, gathered_decode

logger = logging.getLogger(__name__)


class TorchOps:
    """Reference implementations; decode attention gathers the cached blocks, then runs SDPA."""

    name = "torch"
    # Whether decode attention reads only each sequence's own blocks whatever the table's width, which
    # fixed-shape (CUDA graph) decode steps rely on.
    reads_in_place = False
    # The Triton kernels of the fixed-shape steps' LoRA rows (lora_expand), or None: torch matmuls.
    lora_kernels: Any = None

    def pack(self, weights: Iterable[torch.Tensor]) -> None:
        """Prepare the projection weights `linear` will be called with (nothing to do here)."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ weight [out, in]^T."""
        return F.linear(x, weight)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in float32 like the reference implementation, then cast back before the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + delta
        return x, self.rms_norm(x, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary_store(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [T, (H + 2 Hkv) D] -> rotated q [T, H, D], rotated k and v [T, Hkv, D]; k and v are also
        written into the caches at each token's slot."""
        t, head_dim = qkv.shape[0], k_cache.shape[-1]
        qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(t, num_heads + num_kv_heads, head_dim)
        half = head_dim // 2
        qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
        k = qk[:, num_heads:]
        v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(t, num_kv_heads, head_dim)
        k_cache.index_copy_(0, slot_mapping, k)
        v_cache.index_copy_(0, slot_mapping, v)
        return qk[:, :num_heads], k, v

    # (q [B, H, D], the rows' new k/v [B, Hkv, D] already in the caches, caches, batch, layer) -> [B, H, D]
    decode_attention = staticmethod(gathered_decode)


class PackedCpuOps(TorchOps):
    """The torch ops with each projection weight also held in oneDNN's packed layout (a second copy of
    the weights). A matmul of `min_rows` to `max_rows` rows goes through the packed copy, which skips
    re-packing the weight on every call: 1.2-2x faster at 16 rows on the project's CPU. Fewer rows use
    the plain weight, faster there, and so do more, where packing stops paying.

    oneDNN builds (and keeps, about half a MiB each) a kernel for every row count it sees, so the rows
    are padded up to a power of two: a handful of kernels per weight shape, whatever the batches."""

    name = "torch+packed"
    min_rows = 4
    max_rows = 256

    def __init__(self) -> None:
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, packed)

    def pack(self, weights: Iterable[torch.Tensor]) -> None:
        for w in weights:
            self._packed[id(w)] = (w, torch.ops.mkldnn._reorder_linear_weight(w, None))

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        entry = self._packed.get(id(weight)) if self.min_rows <= rows <= self.max_rows else None
        if entry is None or entry[0] is not weight:
            return F.linear(x, weight)
        padded = 1 << (rows - 1).bit_length()
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, entry[1], None, "none", [], "")[:rows]


def packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build has oneDNN's packed linear for `dtype` on the CPU and it agrees with
    F.linear on a small probe (private ops: absent or broken ones leave the plain weights in use)."""
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=gen).to(dtype)
        x = torch.randn(8, 32, generator=gen).to(dtype)
        ops = PackedCpuOps()
        ops.pack([w])
        got = ops.linear(x, w)
    except (AttributeError, RuntimeError) as e:
        logger.info("oneDNN packed linear unavailable (%s): plain matmuls", e)
        return False
    return bool(torch.allclose(got.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2))


class TritonOps(TorchOps):
    """Fused Triton kernels (engine/model/triton_ops.py)."""

    name = "triton"
    reads_in_place = True

    def __init__(self) -> None:
        from engine.model import triton_ops

        self.k = triton_ops
        # Matmuls of a few rows (decode steps of small batches) stream the weight through
        # triton_ops.skinny_matmul where it beat cuBLAS on an H200 (triton_ops.skinny_settings); False
        # (or CHATMED_DISABLE_SKINNY_MATMUL=1, for a card where it does not): cuBLAS always.
        self.skinny = os.environ.get("CHATMED_DISABLE_SKINNY_MATMUL") != "1"
        # Positions each decode attention program reads per loop step; None: decode_keys_for(batch).
        self.decode_keys_per_step: int | None = None

    # Fixed-shape steps put the adapters' A's under the weights (LoraRows), so that the base matmul also
    # does the shrink, and add the deltas with triton_ops.lora_expand. Off: the torch stacked LoRA.
    lora_rows = True

    @property
    def lora_kernels(self) -> Any:
        return self.k if self.lora_rows else None

    def _skinny_settings(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int] | None:
        """skinny_matmul's settings for x's rows against `weight`, or None: cuBLAS."""
        if not (self.skinny and x.stride(1) == 1 and weight.stride(1) == 1):
            return None
        return self.k.skinny_settings(x.shape[0], weight.shape[0], weight.shape[1])

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        settings = self._skinny_settings(x, weight)
        if settings is not None:
            return self.k.skinny_matmul(x, weight, settings)
        return F.linear(x, weight)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.k.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.add_rms_norm(x, delta, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.k.silu_mul(gate_up)

    def rotary_store(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qk = self.k.rotary_store(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
        t, head_dim = qkv.shape[0], k_cache.shape[-1]
        v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(t, num_kv_heads, head_dim)
        return qk[:, :num_heads], qk[:, num_heads:], v

    def decode_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: AttentionBatch,
        layer: int,
    ) -> torch.Tensor:
        assert batch.decode_blocks is not None and batch.decode_lens is not None
        keys = self.decode_keys_per_step or self.decode_keys_for(q.shape[0] * q.shape[1], q.device)
        return self.k.paged_decode_attention(
            q.contiguous(), k_cache, v_cache, batch.decode_blocks, batch.decode_lens, batch.block_size, keys
        )

    def decode_keys_for(self, programs: int, device: torch.device) -> int:
        """Positions per loop step for `programs` (sequences x heads) decode attention programs. No more
        programs than the GPU has multiprocessors leave each one alone on its multiprocessor, waiting on
        its loads: there 256 positions (8 warps) per step keep more reads in flight. On an H200, batch
        1 (32 programs): 4.34 ms a step against 4.72 with 64; at 64 and 256 sequences 128 positions per
        step were slower than 64 (bench/README.md)."""
        return 256 if programs <= multiprocessors(device) else 64


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors; 0 for a CPU (Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_has_bfloat16_matmuls() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles or AVX512-BF16), where oneDNN's
    bfloat16 matmuls beat float32's; elsewhere bfloat16 is emulated and slower. torch's own probe of the
    CPU, where this torch has it; False otherwise."""
    probes = [
        getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    ]
    return any(probe is not None and probe() for probe in probes)


def ops_for(device: torch.device, dtype: torch.dtype, weight_bytes: int = 0) -> TorchOps:
    """Triton kernels on CUDA when Triton is installed (CHATMED_DISABLE_TRITON=1: never); on the CPU the
    torch ops with packed weights where oneDNN has them and a second copy of the `weight_bytes` of
    projections takes at most a quarter of the machine's memory (CHATMED_DISABLE_PACKED=1: never); else
    the torch ops."""
    if device.type == "cuda" and os.environ.get("CHATMED_DISABLE_TRITON") != "1":
        if triton_available():
            return TritonOps()
        logger.warning("Triton is not installed: CUDA runs the torch ops (slower decode, no CUDA graphs)")
    if device.type == "cpu" and os.environ.get("CHATMED_DISABLE_PACKED") != "1":
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if weight_bytes > memory // 4:
            logger.info(
                "projections too large to keep a packed copy (%d MiB): plain matmuls", weight_bytes >> 20
            )
        elif packing_works(dtype):
            return PackedCpuOps()
    return TorchOps()
