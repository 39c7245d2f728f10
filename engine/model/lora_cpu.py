"""The CPU's LoRA kernel (lora_cpu.c): built once per machine with the host's C compiler and called
through ctypes, without the torch dispatcher.

`load_kernel()` returns None where it cannot be built (no compiler, CHATMED_DISABLE_NATIVE_LORA=1); the
engine then adds the deltas with torch matmuls, which compute the same function with other roundings.
The shared library is cached under $CHATMED_CACHE_DIR/kernels, named by a hash of the source, the
compiler, its flags and the CPU's features, so a cache shared between machines never hands one another's
build.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from engine.demo import default_cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.c")
DISABLE_ENV = "CHATMED_DISABLE_NATIVE_LORA"
TILE = 16  # floats per column tile: W in lora_cpu.c
# Tuned for the host first; where the compiler does not know -march=native (some ARM compilers), plain.
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
COMMON_FLAGS = ("-shared", "-fPIC")
# Only where torch runs on GNU OpenMP: the kernel then links the libgomp torch has already loaded (the
# same soname) and shares its threads. Another runtime would bring a second pool of threads.
OPENMP_FLAG = "-fopenmp"
COMPILE_TIMEOUT_S = 120

# A block of a fused projection's B^T, as (r0, r1, c0, c1): rank rows [r0, r1) add to output columns
# [c0, c1).
Block = tuple[int, int, int, int]


class _Weights(ctypes.Structure):
    """lora_weights in lora_cpu.c: one projection of one adapter."""

    _fields_ = [
        ("in_dim", ctypes.c_int64),
        ("rank_pad", ctypes.c_int64),
        ("num_blocks", ctypes.c_int64),
        ("at", ctypes.c_void_p),
        ("bt", ctypes.c_void_p),
        ("blocks", ctypes.c_void_p),
    ]


class _Segment(ctypes.Structure):
    """lora_segment in lora_cpu.c."""

    _fields_ = [("start", ctypes.c_int64), ("end", ctypes.c_int64), ("sites", ctypes.c_void_p)]


# The element types the kernel reads and writes: x, y and the packed weights are all of one of them.
DTYPES = (torch.float32, torch.bfloat16)


def _tiles(m: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> [ceil(cols / TILE), rows, TILE], zero-padded: the kernel's column-tile layout."""
    rows, cols = m.shape
    padded = -(-cols // TILE) * TILE
    out = torch.zeros(rows, padded, dtype=m.dtype)
    out[:, :cols] = m
    return out.view(rows, padded // TILE, TILE).transpose(0, 1).contiguous()


class PackedAdapter:
    """One adapter's weights in the kernel's layout, one entry per site (layer and fused projection, in
    the order the caller numbers them). `sites[i]` is (A [r, in], B^T [r, out], B^T's non-zero blocks),
    or None where the adapter does not touch that projection. The weights keep their dtype, one of
    DTYPES (float32 where there is no site)."""

    def __init__(self, sites: list[tuple[torch.Tensor, torch.Tensor, tuple[Block, ...]] | None]) -> None:
        dtypes = {t.dtype for site in sites if site is not None for t in site[:2]}
        if len(dtypes) > 1 or not dtypes <= set(DTYPES):
            raise ValueError(f"the kernel packs weights of one dtype among {DTYPES}, not {dtypes}")
        self.dtype: torch.dtype | None = dtypes.pop() if dtypes else None  # None: no site, any dtype
        self._table = (_Weights * len(sites))()  # zeroed: num_blocks 0 means "no delta"
        self._keep: list[torch.Tensor] = []  # the tensors the table points into
        self.num_bytes = 0
        # Per site, (in_dim, the output columns it writes up to), which StepPlan.add checks x and y against.
        self.dims: list[tuple[int, int] | None] = [None] * len(sites)
        for i, site in enumerate(sites):
            if site is not None:
                a, b_t, blocks = site
                self._fill(self._table[i], a, b_t, blocks)
                self.dims[i] = (a.shape[1], max((c1 for _, _, _, c1 in blocks), default=0))
        self.address = ctypes.addressof(self._table)

    def _fill(self, entry: _Weights, a: torch.Tensor, b_t: torch.Tensor, blocks: tuple[Block, ...]) -> None:
        at = _tiles(a.t())  # [rank_pad / TILE, in, TILE]
        packed, rows, offset = [], [], 0
        for r0, r1, c0, c1 in blocks:
            tiles = _tiles(b_t[r0:r1, c0:c1])
            packed.append(tiles.flatten())
            rows.append([r0, r1, c0, c1, offset])
            offset += tiles.numel()
        bt = torch.cat(packed)
        table = torch.tensor(rows, dtype=torch.int64)
        entry.in_dim, entry.rank_pad, entry.num_blocks = a.shape[1], at.shape[0] * TILE, len(blocks)
        entry.at, entry.bt, entry.blocks = at.data_ptr(), bt.data_ptr(), table.data_ptr()
        self._keep += [at, bt, table]
        self.num_bytes += at.nbytes + bt.nbytes


class StepPlan:
    """The row segments of one step, each with its adapter: one kernel call per projection."""

    def __init__(
        self, step: Callable[..., None], dtype: torch.dtype, segments: list[tuple[int, int, PackedAdapter]]
    ) -> None:
        self.dtype = dtype
        self._segments = (_Segment * len(segments))(*(_Segment(s, e, p.address) for s, e, p in segments))
        self._adapters = [p for _, _, p in segments]  # keep the tables alive while the plan is
        self._rows = max((end for _, end, _ in segments), default=0)
        self._num_sites = min((len(p.dims) for _, _, p in segments), default=0)
        self._step = step
        self._address = ctypes.addressof(self._segments)

    def add(self, y: torch.Tensor, x: torch.Tensor, site: int) -> None:
        """y[seg] += (x[seg] A^T) B^T for every segment, with its adapter's weights of `site`. x and y:
        CPU tensors [T, *] of the plan's dtype with contiguous columns (`accepts`). A segment of many rows
        runs on torch's threads. Shapes are checked here: the C code trusts them."""
        if not self.accepts(x, y):
            raise ValueError(f"the plan takes {self.dtype} CPU tensors with contiguous columns")
        if min(x.shape[0], y.shape[0]) < self._rows:
            raise ValueError(f"the plan covers {self._rows} rows; x has {x.shape[0]}, y {y.shape[0]}")
        if not 0 <= site < self._num_sites:
            raise IndexError(f"site {site} is outside the adapters' {self._num_sites} sites")
        if self._rows > 1 and (x.stride(0) < x.shape[1] or y.stride(0) < y.shape[1]):
            raise ValueError("rows of x and y must not overlap")
        for adapter in self._adapters:
            dims = adapter.dims[site]
            if dims is not None and (x.shape[1] != dims[0] or y.shape[1] < dims[1]):
                raise ValueError(f"site {site} takes x [T, {dims[0]}] and y [T, >= {dims[1]}]")
        xs, ys = x.stride(0), y.stride(0)
        self._step(self._address, len(self._adapters), site, x.data_ptr(), xs, y.data_ptr(), ys, _threads())

    def accepts(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether the kernel can read x and write y in place."""
        return (
            x.dtype == self.dtype
            and y.dtype == self.dtype
            and x.device.type == "cpu"
            and y.device.type == "cpu"
            and x.stride(1) == 1
            and y.stride(1) == 1
        )


class LoraKernel:
    """The loaded library: one entry point per element type."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._steps: dict[torch.dtype, Callable[..., None]] = {}
        entry_points = {torch.float32: lib.chatmed_lora_step, torch.bfloat16: lib.chatmed_lora_step_bf16}
        for dtype, step in entry_points.items():
            step.restype = None
            step.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, i64]
            self._steps[dtype] = step
        self.library = library

    def plan(self, segments: list[tuple[int, int, PackedAdapter]]) -> StepPlan:
        """A step's plan: rows [start, end) use the packed adapter (all of one dtype)."""
        dtypes = {packed.dtype for _, _, packed in segments if packed.dtype is not None}
        if len(dtypes) > 1:
            raise ValueError(f"one step's adapters are packed in one dtype, not {dtypes}")
        dtype = dtypes.pop() if dtypes else torch.float32
        return StepPlan(self._steps[dtype], dtype, segments)


# The calling thread's torch thread count (torch.set_num_threads is per thread), read at every call.
_threads = torch.get_num_threads


@functools.cache
def load_kernel() -> LoraKernel | None:
    """The kernel, built on first use in this process (under a second here) or found in the cache; None
    where it is disabled or cannot be built."""
    if os.environ.get(DISABLE_ENV) == "1":
        logger.info("native CPU LoRA kernel disabled (%s=1): torch matmuls", DISABLE_ENV)
        return None
    compiler = find_compiler()
    if not compiler:
        logger.info("no C compiler found: the CPU adds LoRA deltas with torch matmuls")
        return None
    try:
        return LoraKernel(_build(compiler, default_cache_dir() / "kernels"))
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("native CPU LoRA kernel unavailable (%s): torch matmuls", e)
        return None


def find_compiler() -> list[str]:
    """$CC (split like a shell would) or the first of cc, gcc and clang on PATH; [] when there is none."""
    configured = shlex.split(os.environ.get("CC", ""))
    return configured or [found for found in map(shutil.which, ("cc", "gcc", "clang")) if found][:1]


def _build(compiler: list[str], folder: Path) -> Path:
    """The library's path in `folder`, compiling it there first if absent (atomically: a parallel build
    by another process is harmless). Each flag set is tried with OpenMP where torch runs on libgomp, then
    without. A flag set that failed leaves a `.failed` file, so later starts go straight to the next."""
    source = SOURCE.read_bytes()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    folder.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    candidates = list(FLAG_SETS)
    if _torch_uses_libgomp():
        candidates = [(*flags, OPENMP_FLAG) for flags in FLAG_SETS] + candidates
    for flags in candidates:
        key = hashlib.sha256(
            b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_features().encode()])
        ).hexdigest()[:16]
        library, failed = folder / f"lora_cpu-{key}.so", folder / f"lora_cpu-{key}.failed"
        if library.is_file():
            return library
        if failed.is_file():
            errors.append(f"{' '.join(flags)}: failed before")
            continue
        error = _compile([*compiler, *flags, *COMMON_FLAGS], library)
        if error is None:
            logger.info("built the native CPU LoRA kernel (%s)", " ".join(flags))
            return library
        failed.write_text(error + "\n")
        errors.append(f"{' '.join(flags)}: {error}")
    raise OSError(f"{compiler[0]} could not build {SOURCE.name}: {'; '.join(errors)}")


def _compile(command: list[str], library: Path) -> str | None:
    """Compile SOURCE into `library` by way of a temporary file; None when done, else why not."""
    fd, tmp = tempfile.mkstemp(dir=library.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [*command, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
        )
        if done.returncode != 0:
            return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        os.replace(tmp, library)
        return None
    except subprocess.TimeoutExpired:
        return "timed out"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _torch_uses_libgomp() -> bool:
    """Whether this process has GNU OpenMP loaded under the name the kernel links (libgomp.so.1, as
    torch's Linux wheels bring it) and torch runs on OpenMP. A renamed copy (libgomp-<hash>.so.1) would
    not be shared: the kernel would load a second runtime."""
    try:
        with open("/proc/self/maps") as f:
            loaded = any(line.rstrip().endswith("/libgomp.so.1") for line in f)
    except OSError:
        return False
    return loaded and "OpenMP" in torch.__config__.parallel_info()


def _cpu_features() -> str:
    """What -march=native depends on: the architecture and, on Linux, the CPU's model and feature flags."""
    features = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    features += line
                if line == "\n":  # the first processor is enough
                    break
    except OSError:
        pass
    return features
