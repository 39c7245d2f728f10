"""The model's small operations, in two interchangeable sets: plain torch (the CPU, and CUDA without
Triton) and Triton kernels (CUDA), which fuse each into one launch and read the KV cache in place.

Both sets compute the same function with the same roundings; the test suite checks the Triton set
against the torch set (under Triton's interpreter when there is no GPU).
"""

from __future__ import annotations

import logging
import os

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

    def decode_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        return gathered_decode(q, k_cache, v_cache, batch)


class TritonOps(TorchOps):
    """Fused Triton kernels (engine/model/triton_ops.py)."""

    name = "triton"
    reads_in_place = True

    def __init__(self) -> None:
        from engine.model import triton_ops

        self.k = triton_ops

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
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        assert batch.decode_blocks is not None and batch.decode_lens is not None
        return self.k.paged_decode_attention(
            q.contiguous(), k_cache, v_cache, batch.decode_blocks, batch.decode_lens, batch.block_size
        )


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ops_for(device: torch.device) -> TorchOps:
    """Triton kernels on CUDA when Triton is installed (CHATMED_DISABLE_TRITON=1: never), else torch."""
    if device.type == "cuda" and os.environ.get("CHATMED_DISABLE_TRITON") != "1":
        if triton_available():
            return TritonOps()
        logger.warning("Triton is not installed: CUDA runs the torch ops (slower decode, no CUDA graphs)")
    return TorchOps()
