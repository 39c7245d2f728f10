"""Logits → next token ids (and logprobs), vectorised over the rows of one engine step.

Order of operations, per row (HF transformers / vLLM / OpenAI semantics):
  1. logprobs from the raw model distribution (log_softmax of the unprocessed logits, vLLM's default);
  2. repetition_penalty over every token of prompt + output (HF: logit / p if logit > 0 else logit * p);
  3. frequency_penalty × count and presence_penalty × [count > 0] over output tokens (OpenAI), subtracted;
  4. while fewer than min_tokens outputs exist, EOS and the stop token ids get -inf;
  5. temperature == 0 → argmax; otherwise logits / temperature, top-k, top-p (nucleus), then a draw.

The draw inverts each row's CDF at one uniform number: exact multinomial sampling that costs one random
number per row instead of one per vocabulary entry (an exponential race over a 32k vocabulary spends more
time in `log` than the rest of the sampler on a CPU). A seeded row takes its uniform from its own
generator, so its tokens depend only on its seed and its own logits, never on the other rows of the batch
or their order. Top-k/top-p look for each row's kept set among its top 16 logits, then its top 128, then
its top 4096, and sort the whole row only when the kept set is wider still; a row kept within its top 128
draws among those alone (the same draw whether its set was found among 16 or 128). The only Python loop
over rows that touches tensors runs over seeded rows.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.types import SamplingParams

# Temperatures below this are treated as greedy: dividing by them overflows float32 logits (as in vLLM).
_MIN_TEMPERATURE = 1e-5
_FLOAT32_MAX = torch.finfo(torch.float32).max
_SEED_MODULUS = 2**64  # torch.Generator.manual_seed accepts [0, 2**64); OpenAI seeds may be negative
# Top logits examined per row, tier after tier, before one full sort of the row. Nuclei at the usual
# top_p and temperature settings fit the first tier; topk(128) of a 32k row costs ~5% of a sort on a
# CPU, topk(4096) ~25%.
CANDIDATE_TIERS = (128, 4096)
# A first look at fewer: at temperature 0.2 and top_p 0.9 (ChatMed's defaults) most nuclei hold a few
# tokens, and topk(16) costs a quarter of topk(128) on a 6k vocabulary, half on a 50k one (CPU).
PROBE_CANDIDATES = 16

Logprobs = tuple[float, list[tuple[int, float]]]


@dataclass
class SamplingRow:
    """One row of a step's logits: the request's parameters, its tokens so far and its generator."""

    params: SamplingParams
    token_ids: Sequence[int]  # the prompt's, then the output's: read, never copied, unless a penalty needs it
    num_prompt_tokens: int
    generator: torch.Generator | None  # per request, Sampler.make_generator(params.seed); None if unseeded

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> Sequence[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class SampleResult:
    """The chosen token of every row and, for rows that asked, (chosen logprob, top [(id, logprob)])."""

    token_ids: list[int]
    logprobs: list[Logprobs | None]


class Sampler:
    """Turns a step's logits [num_rows, vocab] into one token per row. Stateless apart from its settings."""

    def __init__(self, vocab_size: int, eos_token_id: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.device = device

    @staticmethod
    def make_generator(seed: int, device: torch.device) -> torch.Generator:
        """A generator for one request; the same seed always gives the same token stream."""
        generator = torch.Generator(device=device)
        generator.manual_seed(seed % _SEED_MODULUS)
        return generator

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        """Pick the next token of every row. `logits` is not modified; any float dtype, computed in float32.

        Advances the generator of every seeded row that samples (temperature > 0) by one draw.
        """
        raw, token_ids = self._pick(logits, rows)
        params = [row.params for row in rows]
        logprobs: list[Logprobs | None] = [None] * len(rows)
        if any(p.logprobs is not None for p in params):
            logprobs = _gather_logprobs(raw, token_ids, params)
        return SampleResult(token_ids=token_ids.tolist(), logprobs=logprobs)

    def sample_ids(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The tokens `sample` picks, as a [rows] int64 tensor on the device, without logprobs. Nothing
        here waits for the device unless `reads_back(rows)`."""
        return self._pick(logits, rows)[1]

    @staticmethod
    def reads_back(rows: Sequence[SamplingRow]) -> bool:
        """Whether sampling these rows waits for the device: truncation (a drawn row with top-k or top-p)
        reads back which rows its first candidates decide."""
        return any(_truncates(row.params) for row in rows)

    def _pick(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the raw logits in float32, the chosen ids [rows])."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows")
        raw = logits.to(device=self.device, dtype=torch.float32)  # [rows, vocab]; never written to
        processed = self._apply_penalties(raw, rows)
        processed = self._suppress_stop_tokens(processed, rows)
        return raw, self._choose(processed, rows)

    def _apply_penalties(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Repetition, then frequency and presence penalties; id tensors are built only when used."""
        repetition = [row.params.repetition_penalty for row in rows]
        if any(p != 1.0 for p in repetition):
            # Rows without the penalty contribute no ids, so their logits stay untouched.
            seen = [r.token_ids if p != 1.0 else () for r, p in zip(rows, repetition, strict=True)]
            logits = apply_repetition_penalty(
                logits,
                pad_token_ids(seen, self.vocab_size, self.device),
                to_device(repetition, torch.float32, self.device),
            )

        frequency = [row.params.frequency_penalty for row in rows]
        presence = [row.params.presence_penalty for row in rows]
        active = [f != 0.0 or p != 0.0 for f, p in zip(frequency, presence, strict=True)]
        if any(active):
            outputs = [row.output_ids if on else [] for row, on in zip(rows, active, strict=True)]
            counts = token_counts(pad_token_ids(outputs, self.vocab_size, self.device), self.vocab_size)
            logits = apply_frequency_presence_penalty(
                logits,
                counts,
                to_device(frequency, torch.float32, self.device),
                to_device(presence, torch.float32, self.device),
            )
        return logits

    def _suppress_stop_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Rows short of min_tokens may not end: EOS (even with ignore_eos) and stop token ids get -inf."""
        row_index: list[int] = []
        token_index: list[int] = []
        for i, row in enumerate(rows):
            if row.num_output_tokens >= row.params.min_tokens:
                continue
            for token_id in {self.eos_token_id, *row.params.stop_token_ids}:
                if 0 <= token_id < self.vocab_size:  # an id the model cannot produce needs no suppression
                    row_index.append(i)
                    token_index.append(token_id)
        if not row_index:
            return logits
        index = (
            to_device(row_index, torch.long, self.device),
            to_device(token_index, torch.long, self.device),
        )
        return logits.index_put(index, logits.new_full((), float("-inf")))

    def _choose(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Greedy rows take the argmax; the others are tempered, truncated and drawn. Returns [rows] ids."""
        greedy = [row.params.temperature < _MIN_TEMPERATURE for row in rows]
        if all(greedy):
            return _argmax(logits)

        # Greedy rows ride along with neutral settings; their draw is replaced by the argmax below.
        neutral = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
        sampled_params = [neutral if g else row.params for row, g in zip(rows, greedy, strict=True)]
        temperature = [p.temperature for p in sampled_params]
        top_k = [p.top_k for p in sampled_params]
        top_p = [p.top_p for p in sampled_params]
        scaled = logits / to_device(temperature, torch.float32, self.device).unsqueeze(1)
        # A tiny repetition penalty or temperature can push logits past float32's range, and softmax over
        # +inf gives NaN: +inf becomes the largest float (those ids share the mass), NaN becomes -inf
        # (never drawn), and -inf stays (suppressed ids).
        scaled = scaled.nan_to_num(nan=float("-inf"), posinf=_FLOAT32_MAX, neginf=float("-inf"))
        probs = scaled.softmax(dim=-1)  # [rows, vocab]
        generators = [None if g else row.generator for row, g in zip(rows, greedy, strict=True)]
        uniforms = self._uniforms(generators)
        if self.reads_back(rows):
            kept = truncate(
                scaled,
                probs,
                to_device(top_k, torch.long, self.device),
                to_device(top_p, torch.float64, self.device),
            )
            sampled = sample_truncated(scaled, probs, kept, uniforms)
        else:
            sampled = sample_from_probs(probs, uniforms)
        if any(greedy):
            greedy_mask = to_device(greedy, torch.bool, self.device)
            sampled = torch.where(greedy_mask, _argmax(logits), sampled)
        return sampled

    def _uniforms(self, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """One U[0, 1) float64 per row: seeded rows from their own generator, the rest in one batched call."""
        num_rows = len(generators)
        seeded = [i for i, g in enumerate(generators) if g is not None]
        if len(seeded) < num_rows:
            uniforms = torch.rand(num_rows, dtype=torch.float64, device=self.device)
        else:
            uniforms = torch.empty(num_rows, dtype=torch.float64, device=self.device)
        if seeded:
            own = [
                torch.rand(1, dtype=torch.float64, device=self.device, generator=generators[i])
                for i in seeded
            ]
            index = to_device(seeded, torch.long, self.device)
            uniforms.index_copy_(0, index, torch.cat(own))
        return uniforms


def _truncates(params: SamplingParams) -> bool:
    """A drawn row (not greedy) with top-k or top-p."""
    return params.temperature >= _MIN_TEMPERATURE and (params.top_k > 0 or params.top_p < 1.0)


def to_device(
    values: Sequence[float] | Sequence[int] | Sequence[bool], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A few host values as a tensor on `device`. To a GPU they go from pinned memory without waiting:
    an ordinary copy to the GPU first waits for all the work queued on the stream, which in an overlapped
    step (EngineCore) is the forward just launched."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def pad_token_ids(token_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Rows of ids → one [rows, longest] int64 tensor, right-padded with `pad_id` (at least one column)."""
    max_len = max(1, max((len(ids) for ids in token_ids), default=0))
    # array('q') packs the ids at C speed; a nested-list torch.tensor() is several times slower.
    flat = array("q")
    for ids in token_ids:
        flat.extend(ids)
        flat.extend(itertools.repeat(pad_id, max_len - len(ids)))
    padded = torch.frombuffer(flat, dtype=torch.long).view(len(token_ids), max_len)
    if device.type == "cuda":  # as to_device does
        return padded.pin_memory().to(device, non_blocking=True)
    return padded.to(device=device, copy=True)  # the copy owns its memory; `flat` may go


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each vocabulary id occurs in each row of token_ids [rows, len]: [rows, vocab] int32.

    Ids outside [0, vocab) (the padding included) land in a spare column that is dropped.
    """
    index = token_ids.clamp(0, vocab_size)
    counts = torch.zeros(index.shape[0], vocab_size + 1, dtype=torch.int32, device=index.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_repetition_penalty(
    logits: torch.Tensor, token_ids: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """HF's repetition penalty: every id in a row's token_ids gets logit / p when logit > 0, else logit * p.

    logits [rows, vocab] float; token_ids [rows, len] int64, ids outside [0, vocab) ignored (pad with
    vocab); penalty [rows]. Costs O(rows × len), not O(rows × vocab). Returns a new tensor.
    """
    vocab_size = logits.shape[-1]
    padded = F.pad(logits, (0, 1))  # [rows, vocab + 1]: the copy we write into; the spare column absorbs pads
    index = token_ids.clamp(0, vocab_size)
    seen = padded.gather(1, index)
    factor = penalty.to(logits.dtype).unsqueeze(1)
    # Repeated ids write the same value from the same source, so the scatter is deterministic.
    padded.scatter_(1, index, torch.where(seen < 0, seen * factor, seen / factor))
    return padded[:, :vocab_size]


def apply_frequency_presence_penalty(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: logit - frequency × count - presence × [count > 0].

    logits [rows, vocab] float, counts [rows, vocab] int (output tokens only), frequency/presence [rows].
    """
    penalty = frequency.unsqueeze(1) * counts.to(logits.dtype)
    penalty = penalty + presence.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits - penalty


@dataclass
class Truncation:
    """Which tokens top-k and then top-p keep in each row, as `truncate` found them.

    Rows marked narrow keep a prefix of their top candidates (`candidate_keep`); the other rows keep
    every token whose logit is >= `cutoff` (-inf where neither filter is on).
    """

    # [rows, C] int64, the top logits' ids, descending; past a kept prefix found among the first
    # PROBE_CANDIDATES, padding (id 0, probability 0, not kept)
    candidate_ids: torch.Tensor
    candidate_probs: torch.Tensor  # [rows, C] float64, their probabilities before truncation
    candidate_keep: torch.Tensor  # [rows, C] bool, a prefix of each row; meaningful where narrow
    narrow: list[bool]  # the kept set lies within the candidates
    cutoff: torch.Tensor  # [rows], used where not narrow


def truncate(
    logits: torch.Tensor,
    probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    candidate_tiers: Sequence[int] = CANDIDATE_TIERS,
) -> Truncation:
    """Apply top-k, then top-p (nucleus), as transformers' TopKLogitsWarper and TopPLogitsWarper do.

    logits [rows, vocab] float, already divided by the temperature, and probs = their softmax;
    top_k [rows] int64, <= 0 means off; top_p [rows] float64, 1 means off. Top-k keeps ties with the
    k-th logit; the nucleus is the smallest set of most likely tokens whose mass (after top-k,
    renormalised) reaches p, and holds at least one token. A row is decided among its top
    candidate_tiers[0] logits when its kept set ends there (narrow), else among the next tier's, and
    so on, else by one full sort of the row.
    """
    if not candidate_tiers:
        raise ValueError("at least one candidate tier is needed")
    vocab_size = logits.shape[-1]
    active = (top_k > 0) | (top_p < 1.0)
    candidate_ids, candidate_probs, keep, decided = _first_tier(
        logits, probs, top_k, top_p, active, min(candidate_tiers[0], vocab_size)
    )
    narrow, wide = (active & decided).tolist(), (active & ~decided).tolist()
    cutoff = torch.full((logits.shape[0],), float("-inf"), dtype=logits.dtype, device=logits.device)
    wide_rows = [i for i, w in enumerate(wide) if w]
    if wide_rows:
        index = torch.tensor(wide_rows, dtype=torch.long, device=logits.device)
        wide_cutoffs = _wide_cutoffs(
            logits[index], probs[index], top_k[index], top_p[index], candidate_tiers[1:]
        )
        cutoff = cutoff.index_copy(0, index, wide_cutoffs)
    return Truncation(candidate_ids, candidate_probs, keep, narrow, cutoff)


def _first_tier(
    logits: torch.Tensor,
    probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    active: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top candidates (ids, probs, keep, decided; see _candidate_keep), `width` of them, found
    among the top PROBE_CANDIDATES first: when an active row is not decided there, those rows are looked
    at again `width` wide, and the others' columns padded to `width` with unkept ones. A row decided in
    the probe keeps the prefix it would keep among `width`. With every row decided there, the candidates
    are the probe's alone."""
    vocab_size = logits.shape[-1]
    # Every row goes through the probe, whatever the others need: which candidates a row is decided among
    # (and so the order of tied logits it draws over) then depends on the row alone.
    probe = min(PROBE_CANDIDATES, width)
    candidates, ids = logits.topk(probe, dim=-1)  # [rows, probe], descending
    cand_probs = probs.gather(1, ids).double()
    keep, decided = _candidate_keep(candidates, cand_probs, top_k, top_p, vocab_size)
    again = (active & ~decided).nonzero().squeeze(1)
    if probe == width or again.numel() == 0:
        return ids, cand_probs, keep, decided
    wide, wide_ids = logits[again].topk(width, dim=-1)
    wide_probs = probs[again].gather(1, wide_ids).double()
    wide_keep, wide_decided = _candidate_keep(wide, wide_probs, top_k[again], top_p[again], vocab_size)
    pad = (0, width - probe)
    ids, cand_probs, keep = F.pad(ids, pad), F.pad(cand_probs, pad), F.pad(keep, pad)
    ids, cand_probs = ids.index_copy(0, again, wide_ids), cand_probs.index_copy(0, again, wide_probs)
    keep, decided = keep.index_copy(0, again, wide_keep), decided.index_copy(0, again, wide_decided)
    return ids, cand_probs, keep, decided


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    candidate_tiers: Sequence[int] = CANDIDATE_TIERS,
) -> torch.Tensor:
    """The filtering the sampler applies, as logits: -inf outside each row's kept set (see truncate)."""
    kept = truncate(logits, logits.softmax(dim=-1), top_k, top_p, candidate_tiers)
    keep = logits >= kept.cutoff.unsqueeze(1)
    if any(kept.narrow):
        # Only kept entries are written: a row found in the probe has padding columns (id 0, unkept).
        rows, cols = kept.candidate_keep.nonzero(as_tuple=True)
        keep_narrow = torch.zeros_like(keep)
        keep_narrow[rows, kept.candidate_ids[rows, cols]] = True
        narrow = torch.tensor(kept.narrow, dtype=torch.bool, device=logits.device).unsqueeze(1)
        keep = torch.where(narrow, keep_narrow, keep)
    return logits.masked_fill(~keep, float("-inf"))


def sample_truncated(
    logits: torch.Tensor, probs: torch.Tensor, kept: Truncation, uniforms: torch.Tensor
) -> torch.Tensor:
    """Draw one id per row from probs [rows, vocab] restricted to the kept tokens. Returns [rows] int64.

    Narrow rows draw among their few candidates; only the others touch the whole vocabulary.
    """
    if all(kept.narrow):  # the usual case at ChatMed's settings: no row needs selecting
        position = sample_from_probs(kept.candidate_probs * kept.candidate_keep, uniforms)
        return kept.candidate_ids.gather(1, position.unsqueeze(1)).squeeze(1)
    num_rows = logits.shape[0]
    sampled = torch.empty(num_rows, dtype=torch.long, device=logits.device)
    narrow_rows = [i for i, n in enumerate(kept.narrow) if n]
    other_rows = [i for i, n in enumerate(kept.narrow) if not n]
    if narrow_rows:
        index = torch.tensor(narrow_rows, dtype=torch.long, device=logits.device)
        candidate_probs = kept.candidate_probs[index] * kept.candidate_keep[index]  # [narrow, C]
        position = sample_from_probs(candidate_probs, uniforms[index])
        sampled[index] = kept.candidate_ids[index].gather(1, position.unsqueeze(1)).squeeze(1)
    if other_rows:
        index = torch.tensor(other_rows, dtype=torch.long, device=logits.device)
        # Selecting every row would copy [rows, vocab] tensors for nothing.
        row_logits, row_probs = (logits, probs) if not narrow_rows else (logits[index], probs[index])
        row_probs = row_probs.masked_fill(row_logits < kept.cutoff[index].unsqueeze(1), 0.0)
        sampled[index] = sample_from_probs(row_probs, uniforms[index])
    return sampled


def _candidate_keep(
    candidates: torch.Tensor,
    candidate_probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept prefix of its top candidate logits [rows, C] (descending), given their probs.

    Returns (keep [rows, C] bool, decided [rows] bool); where decided is False the kept set may reach
    past the candidates and keep is meaningless.
    """
    num_candidates = candidates.shape[-1]
    k_on = top_k > 0
    p_on = top_p < 1.0
    if not bool(k_on.any()):  # top-p alone (ChatMed's defaults): the same values, a third of the operations
        mass_before = candidate_probs.cumsum(dim=-1) - candidate_probs
        keep = (mass_before < top_p.unsqueeze(1)) | ~p_on.unsqueeze(1)
        return keep, ~keep[:, -1] | (num_candidates == vocab_size)
    k = torch.where(k_on, top_k.clamp(max=vocab_size), vocab_size)
    kth = candidates.gather(1, (k.clamp(max=num_candidates) - 1).unsqueeze(1))  # [rows, 1]
    survives_k = (candidates >= kth) | ~k_on.unsqueeze(1)  # a prefix of each row

    # Top-p measures mass in the distribution left after top-k (transformers renormalises in between).
    probs = candidate_probs * survives_k
    probs = torch.where(k_on.unsqueeze(1), probs / probs.sum(dim=-1, keepdim=True), probs)
    mass_before = probs.cumsum(dim=-1) - probs
    # The first candidate is always kept: its mass_before is exactly 0 < p.
    keep = survives_k & ((mass_before < top_p.unsqueeze(1)) | ~p_on.unsqueeze(1))

    # The kept set ends inside the candidates unless it fills them (it may continue past them), or
    # top-k's survivors (ties included) reach past them: the renormalisation above then misses mass.
    k_inside = ~k_on | ((k <= num_candidates) & ~survives_k[:, -1])
    decided = (~keep[:, -1] & k_inside) | (num_candidates == vocab_size)
    return keep, decided


def _wide_cutoffs(
    logits: torch.Tensor,
    probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    candidate_tiers: Sequence[int],
) -> torch.Tensor:
    """The smallest logit each row keeps: among the first tier's candidates, else the next tiers'."""
    if not candidate_tiers or logits.shape[0] == 0:
        return _cutoffs_by_sort(logits, top_k, top_p)
    vocab_size = logits.shape[-1]
    candidates, candidate_ids = logits.topk(min(candidate_tiers[0], vocab_size), dim=-1)  # [rows, C]
    keep, decided = _candidate_keep(
        candidates, probs.gather(1, candidate_ids).double(), top_k, top_p, vocab_size
    )
    cutoff = candidates.gather(1, keep.sum(dim=-1, keepdim=True) - 1).squeeze(1)
    undecided = (~decided).nonzero().squeeze(1)
    if undecided.numel() > 0:
        rest = _wide_cutoffs(
            logits[undecided], probs[undecided], top_k[undecided], top_p[undecided], candidate_tiers[1:]
        )
        cutoff = cutoff.index_copy(0, undecided, rest)
    return cutoff


def _cutoffs_by_sort(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The smallest logit each row keeps, found by one full ascending sort as transformers' warpers do."""
    vocab_size = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1).values  # [rows, vocab], ascending
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    kth_largest = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))  # [rows, 1]
    remove = sorted_logits < kth_largest

    # Tokens whose ascending cumulative mass is <= 1 - p are outside the nucleus. The threshold is
    # computed in float64 and then rounded, so it equals what transformers compares against.
    cumulative = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1).cumsum(dim=-1)
    threshold = (1.0 - top_p).to(cumulative.dtype).unsqueeze(1)
    outside_nucleus = (cumulative <= threshold) & (top_p < 1.0).unsqueeze(1)
    outside_nucleus[:, -1] = False  # the most likely token always stays
    # Both filters remove a prefix of the ascending order; the first survivor is the cutoff.
    num_removed = (remove | outside_nucleus).sum(dim=-1)
    return sorted_logits.gather(1, num_removed.unsqueeze(1)).squeeze(1)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one id per row of probs [rows, n] by inverting its CDF at uniforms [rows] in [0, 1].

    Rows need not be normalised. A zero-probability id is never returned, except from a row without
    any mass (all zero or NaN, which only a broken model gives): that row gets its last id rather than
    one past the end. Returns [rows] int64.
    """
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # float64 so that tail ids keep their width
    total = cdf[:, -1:]
    # u = 1 (some CUDA generators return it) would point past the end: the largest float64 below the
    # total still selects a real token.
    below_total = total.nextafter(torch.zeros_like(total))
    target = torch.minimum(uniforms.to(torch.float64).unsqueeze(1) * total, below_total)  # [rows, 1]
    # The first id whose CDF exceeds the target: cdf[i - 1] <= target < cdf[i], so probs[i] > 0.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim (the first of tied maxima); max().indices is ~2x faster on CPU."""
    return logits.max(dim=-1).indices


def _gather_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
) -> list[Logprobs | None]:
    """(chosen logprob, top-n [(id, logprob)] sorted descending) for rows with logprobs set, else None."""
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    index = torch.tensor(wanted, dtype=torch.long, device=raw_logits.device)
    logprobs = raw_logits.index_select(0, index).log_softmax(dim=-1)  # [wanted, vocab]
    chosen = logprobs.gather(1, token_ids.index_select(0, index).unsqueeze(1)).squeeze(1).tolist()
    max_top = min(max(params[i].logprobs or 0 for i in wanted), raw_logits.shape[-1])
    top_values: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if max_top > 0:
        values, ids = logprobs.topk(max_top, dim=-1)  # sorted descending
        top_values, top_ids = values.tolist(), ids.tolist()

    result: list[Logprobs | None] = [None] * len(params)
    for j, i in enumerate(wanted):
        n = params[i].logprobs or 0
        result[i] = (chosen[j], list(zip(top_ids[j][:n], top_values[j][:n], strict=True)))
    return result
