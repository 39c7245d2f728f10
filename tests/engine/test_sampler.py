"""Sampler tests: greedy, seeded reproducibility, sampled distributions, penalties and truncation against
transformers' logits processors, min_tokens and logprobs. Small vocabularies, random logits, CPU."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine import sampler as sampler_module
from engine.sampler import (
    Sampler,
    SamplingRow,
    Truncation,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    apply_top_k_top_p,
    pad_token_ids,
    sample_from_probs,
    sample_truncated,
    token_counts,
    truncate,
)
from engine.types import SamplingParams

VOCAB = 50
EOS = 2
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _isolated_rng() -> Iterator[None]:
    """Seed the default RNG for determinism without leaking state into other tests."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        yield


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(vocab_size=VOCAB, eos_token_id=EOS, device=CPU)


def _row(
    params: SamplingParams,
    output_ids: Sequence[int] = (),
    prompt_ids: Sequence[int] = (1, 5, 7),
) -> SamplingRow:
    generator = Sampler.make_generator(params.seed, CPU) if params.seed is not None else None
    return SamplingRow(params, [*prompt_ids, *output_ids], len(prompt_ids), generator)


def _random_logits(num_rows: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab, generator=g) * 3


# --- greedy -------------------------------------------------------------------------------------------


def test_greedy_is_argmax(sampler: Sampler) -> None:
    logits = _random_logits(6, seed=0)
    logits[5, 7] = logits[5, 9] = logits[5].max() + 1  # a tie takes the lower id, as argmax does
    rows = [_row(SamplingParams(temperature=0.0)) for _ in range(6)]
    result = sampler.sample(logits, rows)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.token_ids[5] == 7
    assert result.logprobs == [None] * 6


def test_greedy_ignores_top_k_top_p_and_consumes_no_randomness(sampler: Sampler) -> None:
    logits = _random_logits(4, seed=1)
    params = SamplingParams(temperature=0.0, top_k=1, top_p=0.01, seed=7)
    rows = [_row(params) for _ in range(4)]
    generator_state = rows[0].generator.get_state() if rows[0].generator else None
    default_state = torch.get_rng_state()
    result = sampler.sample(logits, rows)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert torch.equal(torch.get_rng_state(), default_state)
    assert generator_state is not None and rows[0].generator is not None
    assert torch.equal(rows[0].generator.get_state(), generator_state)


def test_greedy_rows_in_a_sampled_batch_take_the_argmax(sampler: Sampler) -> None:
    logits = _random_logits(6, seed=2)
    rows = [_row(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5, top_k=5)) for i in range(6)]
    result = sampler.sample(logits, rows)
    argmax = logits.argmax(dim=-1).tolist()
    assert [result.token_ids[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


def test_input_logits_are_not_modified_and_low_precision_is_accepted(sampler: Sampler) -> None:
    logits = _random_logits(3, seed=3)
    before = logits.clone()
    params = SamplingParams(temperature=0.8, top_p=0.5, repetition_penalty=1.3, frequency_penalty=1.0)
    rows = [_row(params, output_ids=[1, 2, 3]) for _ in range(3)]
    sampler.sample(logits, rows)
    assert torch.equal(logits, before)
    result = sampler.sample(logits.to(torch.bfloat16), [_row(SamplingParams(temperature=0.0))] * 3)
    assert result.token_ids == logits.to(torch.bfloat16).float().argmax(dim=-1).tolist()


def test_rows_and_logits_must_agree(sampler: Sampler) -> None:
    with pytest.raises(ValueError):
        sampler.sample(_random_logits(2, seed=0), [_row(SamplingParams())])


# --- seeded reproducibility ---------------------------------------------------------------------------


def _seeded_stream(sampler: Sampler, seed: int, companions: int, position: int, steps: int = 20) -> list[int]:
    """Sample `steps` tokens for one seeded request, placed at `position` among random companion rows."""
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=seed)
    target = _row(params)
    companion_params = [
        SamplingParams(temperature=1.0, seed=100 + i) if i % 2 else SamplingParams(temperature=0.7)
        for i in range(companions)
    ]
    companion_rows = [_row(p) for p in companion_params]
    tokens: list[int] = []
    for step in range(steps):
        own_logits = _random_logits(1, seed=10_000 + step)  # the target's logits depend on the step only
        other_logits = _random_logits(companions, seed=step * 7 + companions + position)
        rows = [*companion_rows]
        rows.insert(position, target)
        logits = torch.cat([other_logits[:position], own_logits, other_logits[position:]])
        result = sampler.sample(logits, rows)
        tokens.append(result.token_ids[position])
        target.token_ids = [*target.token_ids, result.token_ids[position]]
        for i, row in enumerate(companion_rows):
            row.token_ids = [*row.token_ids, result.token_ids[i if i < position else i + 1]]
    return tokens


def test_seeded_row_is_independent_of_batch_and_position(sampler: Sampler) -> None:
    alone = _seeded_stream(sampler, seed=42, companions=0, position=0)
    in_batch_first = _seeded_stream(sampler, seed=42, companions=5, position=0)
    in_batch_middle = _seeded_stream(sampler, seed=42, companions=5, position=3)
    in_batch_last = _seeded_stream(sampler, seed=42, companions=5, position=5)
    assert alone == in_batch_first == in_batch_middle == in_batch_last
    # A different seed gives a different stream (20 draws of a 50-token vocab: collision is negligible).
    assert _seeded_stream(sampler, seed=43, companions=0, position=0) != alone


def test_make_generator_accepts_any_int_seed() -> None:
    for seed in (0, -1, 2**63, 2**70, -(2**70)):
        a = Sampler.make_generator(seed, CPU)
        b = Sampler.make_generator(seed, CPU)
        assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    a, b = Sampler.make_generator(1, CPU), Sampler.make_generator(2, CPU)
    assert not torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --- distributions ------------------------------------------------------------------------------------

_SMALL_LOGITS = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.7, 1.2])
_NUM_DRAWS = 20_000


def _frequencies(token_ids: Sequence[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(token_ids), minlength=vocab).float() / len(token_ids)


def test_temperature_one_matches_softmax() -> None:
    vocab = _SMALL_LOGITS.numel()
    sampler = Sampler(vocab_size=vocab, eos_token_id=0, device=CPU)
    logits = _SMALL_LOGITS.expand(_NUM_DRAWS, vocab)
    rows = [_row(SamplingParams(temperature=1.0))] * _NUM_DRAWS
    observed = _frequencies(sampler.sample(logits, rows).token_ids, vocab)
    expected = torch.softmax(_SMALL_LOGITS, dim=-1)
    assert (observed - expected).abs().max().item() < 0.02


def test_seeded_rows_draw_from_the_same_distribution() -> None:
    vocab = _SMALL_LOGITS.numel()
    sampler = Sampler(vocab_size=vocab, eos_token_id=0, device=CPU)
    rows = [_row(SamplingParams(seed=seed)) for seed in range(4000)]
    observed = _frequencies(sampler.sample(_SMALL_LOGITS.expand(4000, vocab), rows).token_ids, vocab)
    assert (observed - torch.softmax(_SMALL_LOGITS, dim=-1)).abs().max().item() < 0.03


def test_sample_from_probs_inverts_the_cdf() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).expand(7, 5)
    uniforms = torch.tensor([0.0, 0.2499, 0.25, 0.9, 1.0 - 2**-53, 1.0, 0.5], dtype=torch.float64)
    assert sample_from_probs(probs, uniforms).tolist() == [1, 1, 3, 3, 3, 3, 3]
    unnormalised = torch.tensor([[2.0, 0.0, 6.0]])
    assert sample_from_probs(unnormalised, torch.tensor([0.2])).tolist() == [0]
    assert sample_from_probs(unnormalised, torch.tensor([0.3])).tolist() == [2]


def test_temperature_and_top_k_sample_the_renormalised_top_k() -> None:
    vocab = _SMALL_LOGITS.numel()
    sampler = Sampler(vocab_size=vocab, eos_token_id=0, device=CPU)
    logits = _SMALL_LOGITS.expand(_NUM_DRAWS, vocab)
    rows = [_row(SamplingParams(temperature=0.7, top_k=3))] * _NUM_DRAWS
    observed = _frequencies(sampler.sample(logits, rows).token_ids, vocab)
    top3 = _SMALL_LOGITS.topk(3).indices
    expected = torch.zeros(vocab)
    expected[top3] = torch.softmax(_SMALL_LOGITS[top3] / 0.7, dim=-1)
    assert set(torch.nonzero(observed).flatten().tolist()) == set(top3.tolist())
    assert (observed - expected).abs().max().item() < 0.02


def test_both_truncated_draw_paths_sample_the_kept_distribution() -> None:
    """With 3 candidates, top_k=2 rows draw among candidates, top_p=0.8 rows (4 tokens) over the vocab."""
    vocab, half = _SMALL_LOGITS.numel(), _NUM_DRAWS // 2
    logits = _SMALL_LOGITS.expand(2 * half, vocab)
    top_k = torch.tensor([2] * half + [0] * half)
    top_p = torch.tensor([1.0] * half + [0.8] * half, dtype=torch.float64)
    kept = truncate(logits, logits.softmax(dim=-1), top_k, top_p, candidate_tiers=(3,))
    assert kept.narrow == [True] * half + [False] * half
    drawn = sample_truncated(logits, logits.softmax(dim=-1), kept, torch.rand(2 * half, dtype=torch.float64))
    for rows, k, p in ((slice(0, half), 2, 1.0), (slice(half, None), 0, 0.8)):
        filtered = apply_top_k_top_p(
            _SMALL_LOGITS.unsqueeze(0), torch.tensor([k]), torch.tensor([p], dtype=torch.float64), (vocab,)
        )
        expected = torch.softmax(filtered[0], dim=-1)
        observed = _frequencies(drawn[rows].tolist(), vocab)
        assert set(observed.nonzero().flatten().tolist()) == set(expected.nonzero().flatten().tolist())
        assert (observed - expected).abs().max().item() < 0.02


def test_top_k_two_only_yields_the_top_two(sampler: Sampler) -> None:
    logits = _random_logits(1, seed=5).expand(2000, VOCAB)
    rows = [_row(SamplingParams(temperature=2.0, top_k=2))] * 2000
    drawn = set(sampler.sample(logits, rows).token_ids)
    assert drawn == set(logits[0].topk(2).indices.tolist())


# The vocabulary order is shuffled so that scattering back from sorted order is exercised.
_NUCLEUS_PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])


@pytest.mark.parametrize(
    ("top_p", "kept"),
    # 1e-9 rounds 1 - p to 1.0 in float32: only the keep-at-least-one rule saves the top token.
    [(0.4, {1}), (0.75, {1, 3}), (0.85, {1, 3, 0}), (0.99, {0, 1, 2, 3}), (1e-6, {1}), (1e-9, {1})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    logits = _NUCLEUS_PROBS.log().unsqueeze(0)
    for tiers in ((1,), (4,)):  # by a sort, among the candidates
        p = torch.tensor([top_p], dtype=torch.float64)
        filtered = apply_top_k_top_p(logits, torch.tensor([0]), p, tiers)
        assert set(torch.isfinite(filtered[0]).nonzero().flatten().tolist()) == kept
    sampler = Sampler(vocab_size=4, eos_token_id=3, device=CPU)
    rows = [_row(SamplingParams(top_p=top_p))] * 3000
    drawn = set(sampler.sample(logits.expand(3000, 4), rows).token_ids)
    assert drawn == kept  # 3000 draws see every kept token (the rarest has p >= 0.05)


def test_probe_tier_changes_no_kept_set_and_no_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose nucleus lies in the top 16, rows looked at again 128 wide, rows past 128 and rows whose
    top_k is beyond the probe: the same kept sets and the same tokens as without the probe."""
    vocab, rows = 2000, 48
    gen = torch.Generator().manual_seed(11)
    # From nearly flat rows to very peaked ones (temperature 0.2 on sharp logits).
    sharpness = torch.logspace(-1.5, 1.3, rows).unsqueeze(1)
    logits = torch.randn(rows, vocab, generator=gen) * sharpness
    probs = logits.softmax(dim=-1)
    top_k = torch.tensor([0, 0, 5, 40] * (rows // 4))
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.95] * (rows // 4), dtype=torch.float64)
    uniforms = torch.rand(rows, generator=gen, dtype=torch.float64)

    def run() -> tuple[Truncation, torch.Tensor]:
        kept = truncate(logits, probs, top_k, top_p)
        return kept, sample_truncated(logits, probs, kept, uniforms)

    probed, probed_tokens = run()
    monkeypatch.setattr(sampler_module, "PROBE_CANDIDATES", vocab)
    plain, plain_tokens = run()
    sizes = probed.candidate_keep.sum(dim=-1)
    narrow = torch.tensor(probed.narrow)
    assert (narrow & (sizes <= 16)).any() and (narrow & (sizes > 16)).any() and (~narrow).any()
    assert probed.narrow == plain.narrow
    assert torch.equal(probed.cutoff, plain.cutoff)
    assert torch.equal(sizes[narrow], plain.candidate_keep.sum(dim=-1)[narrow])
    assert torch.equal(probed_tokens, plain_tokens)


# --- against transformers' processors ------------------------------------------------------------------


def test_repetition_penalty_matches_transformers() -> None:
    logits = _random_logits(4, seed=6)
    gen = torch.Generator().manual_seed(6)
    input_ids = torch.randint(0, VOCAB, (4, 30), generator=gen)  # repeats included
    penalties = [1.3, 0.8, 2.0, 1.05]
    ours = apply_repetition_penalty(logits, input_ids, torch.tensor(penalties))
    for i, penalty in enumerate(penalties):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(input_ids[i : i + 1], logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], theirs, rtol=0, atol=0)


def test_sampler_repetition_penalty_covers_prompt_and_output_like_transformers(
    sampler: Sampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    logits = _random_logits(2, seed=7)
    prompt, output = [3, 9, 9, 11], [12, 3, 40]
    rows = [
        _row(SamplingParams(temperature=0.0, repetition_penalty=1.5), output, prompt),
        _row(SamplingParams(temperature=0.0), output, prompt),
    ]
    captured: list[torch.Tensor] = []
    original_choose = sampler._choose

    def capture(processed: torch.Tensor, sampled_rows: Sequence[SamplingRow]) -> torch.Tensor:
        captured.append(processed)
        return original_choose(processed, sampled_rows)

    monkeypatch.setattr(sampler, "_choose", capture)  # sees the logits after penalties, before the draw
    sampler.sample(logits, rows)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + output]), logits[:1].clone())
    torch.testing.assert_close(captured[0][:1], expected, rtol=0, atol=0)
    torch.testing.assert_close(captured[0][1:], logits[1:], rtol=0, atol=0)  # penalty 1.0 touches nothing


# Candidate tiers that force each path: all sorted, tier 2 then sort, narrow then sort, all narrow.
_TIERS = [(1,), (1, 8), (8,), (VOCAB,)]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.8), (0.5, 1, 0.5), (1.0, 100, 0.3), (2.0, 3, 0.99)],
)
@pytest.mark.parametrize("tiers", _TIERS)
def test_temperature_top_k_top_p_match_transformers(
    temperature: float, top_k: int, top_p: float, tiers: tuple[int, ...]
) -> None:
    logits = _random_logits(8, seed=int(temperature * 10) + top_k)
    scaled = logits / torch.full((8, 1), temperature)
    ours = apply_top_k_top_p(
        scaled, torch.full((8,), top_k), torch.full((8,), top_p, dtype=torch.float64), tiers
    )
    theirs = TemperatureLogitsWarper(temperature)(torch.empty(0), logits.clone())
    torch.testing.assert_close(scaled, theirs, rtol=0, atol=0)
    if top_k > 0:
        theirs = TopKLogitsWarper(top_k)(torch.empty(0), theirs)
    if top_p < 1.0:
        theirs = TopPLogitsWarper(top_p)(torch.empty(0), theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_per_row_top_k_top_p_equal_each_row_alone() -> None:
    logits = _random_logits(4, seed=8)
    top_k = torch.tensor([0, 3, 0, 7])
    top_p = torch.tensor([1.0, 1.0, 0.6, 0.9], dtype=torch.float64)
    batched = apply_top_k_top_p(logits, top_k, top_p, (6,))  # wider rows are sorted
    for i in range(4):
        alone = apply_top_k_top_p(logits[i : i + 1], top_k[i : i + 1], top_p[i : i + 1], (6,))
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=0)
    assert torch.equal(batched[0], logits[0])  # both filters off leaves the row alone
    assert torch.isfinite(batched[1]).sum().item() == 3


@pytest.mark.parametrize("tiers", [(1,), (2,), (3,), (5,), (1, 3), (2, 5)])
def test_top_k_keeps_ties_with_the_kth_logit(tiers: tuple[int, ...]) -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    no_p = torch.tensor([1.0], dtype=torch.float64)
    filtered = apply_top_k_top_p(logits, torch.tensor([2]), no_p, tiers)
    assert torch.isfinite(filtered[0]).nonzero().flatten().tolist() == [0, 2, 3]
    # top-p after top-k renormalises over the survivors: 3.0 alone holds e^3 / (e^3 + 2e^2) = 0.58 of it.
    p = torch.tensor([0.55], dtype=torch.float64)
    filtered = apply_top_k_top_p(logits, torch.tensor([2]), p, tiers)
    assert torch.isfinite(filtered[0]).nonzero().flatten().tolist() == [0]


@pytest.mark.parametrize("tiers", [(128, 4096), (16, 64), (16,)])
def test_wide_nuclei_in_a_large_vocabulary_match_transformers(tiers: tuple[int, ...]) -> None:
    """A 1000-token vocabulary: peaked rows are cut in the first tier, flat ones later or by a sort."""
    gen = torch.Generator().manual_seed(11)
    scales = torch.tensor([0.05, 0.3, 1.0, 4.0, 10.0, 0.01])  # flat ... peaked
    logits = torch.randn(6, 1000, generator=gen) * scales.unsqueeze(1)
    top_k = torch.tensor([0, 0, 300, 0, 50, 0])
    top_p = torch.tensor([0.9, 0.95, 0.9, 0.8, 1.0, 0.5], dtype=torch.float64)
    ours = apply_top_k_top_p(logits, top_k, top_p, tiers)
    for i in range(6):
        theirs = logits[i : i + 1].clone()
        if top_k[i] > 0:
            theirs = TopKLogitsWarper(int(top_k[i]))(torch.empty(0), theirs)
        if top_p[i] < 1:
            theirs = TopPLogitsWarper(float(top_p[i]))(torch.empty(0), theirs)
        assert torch.equal(torch.isinf(ours[i : i + 1]), torch.isinf(theirs)), f"row {i}"
    kept = torch.isfinite(ours).sum(dim=-1)
    assert kept[0] > 128 and kept[3] < 16 and 16 < kept[4] < 64  # every path was taken


def test_seeded_rows_are_batch_independent_across_truncation_paths() -> None:
    sampler = Sampler(vocab_size=1000, eos_token_id=0, device=CPU)
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 1000, generator=gen) * torch.tensor([[0.05], [5.0], [0.05], [5.0]])
    batched: list[int] = []
    alone: list[int] = []
    for step in range(10):
        params = [SamplingParams(top_p=0.9, seed=4 * step + i) for i in range(4)]
        batched.extend(sampler.sample(logits, [_row(p) for p in params]).token_ids)
        for i, p in enumerate(params):
            alone.extend(sampler.sample(logits[i : i + 1], [_row(p)]).token_ids)
    assert batched == alone
    assert len(set(batched[0::4])) > 1  # different seeds really draw differently


# --- frequency / presence penalties --------------------------------------------------------------------


def test_frequency_and_presence_penalties_by_hand() -> None:
    counts = token_counts(pad_token_ids([[1, 1, 2], [], [4]], 6, CPU), vocab_size=6)
    assert counts.tolist() == [[0, 2, 1, 0, 0, 0], [0] * 6, [0, 0, 0, 0, 1, 0]]
    logits = torch.zeros(3, 6)
    penalised = apply_frequency_presence_penalty(
        logits, counts, torch.tensor([0.5, 0.5, -1.0]), torch.tensor([0.25, 0.25, 0.5])
    )
    assert penalised.tolist() == [
        [0, -1.25, -0.75, 0, 0, 0],
        [0] * 6,
        [0, 0, 0, 0, 0.5, 0],  # negative frequency_penalty encourages repeats: 0 - (-1 * 1) - 0.5
    ]


def test_sampler_frequency_penalty_counts_output_not_prompt(sampler: Sampler) -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10] = 1.0  # in the prompt only: untouched
    logits[0, 20] = 1.5  # twice in the output: 1.5 - 2 * 0.5 - 0.1 = 0.4
    logits[0, 30] = 0.9
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.1)
    result = sampler.sample(logits, [_row(params, output_ids=[20, 20], prompt_ids=[10])])
    assert result.token_ids == [10]


def test_token_counts_and_padding_ignore_ids_outside_the_vocabulary() -> None:
    padded = pad_token_ids([[0, 7, 99], (5,), []], pad_id=8, device=CPU)
    assert padded.tolist() == [[0, 7, 99], [5, 8, 8], [8, 8, 8]]
    assert pad_token_ids([[], []], pad_id=8, device=CPU).tolist() == [[8], [8]]
    counts = token_counts(padded, vocab_size=8)
    assert counts.tolist() == [[1, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1, 0, 0], [0] * 8]
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.0, 0.0, 4.0, 0.0, 3.0]]).expand(3, 8)
    penalised = apply_repetition_penalty(logits, padded, torch.tensor([2.0, 2.0, 2.0]))
    assert penalised.tolist() == [
        [0.5, -1.0, 2.0, 0.0, 0.0, 4.0, 0.0, 1.5],
        [1.0, -1.0, 2.0, 0.0, 0.0, 2.0, 0.0, 3.0],
        logits[2].tolist(),
    ]


# --- min_tokens ---------------------------------------------------------------------------------------


def test_min_tokens_suppresses_eos_and_stop_token_ids(sampler: Sampler) -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 30.0
    logits[0, 17] = 20.0
    logits[0, 5] = 10.0
    short = SamplingParams(min_tokens=3, stop_token_ids=(17,), ignore_eos=True)
    greedy_short = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(17,))
    rows = [_row(greedy_short, output_ids=[1, 1]), *[_row(short, output_ids=[1]) for _ in range(200)]]
    result = sampler.sample(logits.expand(len(rows), VOCAB), rows)
    assert result.token_ids[0] == 5
    assert EOS not in result.token_ids and 17 not in result.token_ids

    done = _row(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(17,)), output_ids=[1, 1, 1])
    assert sampler.sample(logits, [done]).token_ids == [EOS]


# --- extreme settings -----------------------------------------------------------------------------------


def test_a_vanishing_repetition_penalty_draws_among_the_repeated_positive_ids(sampler: Sampler) -> None:
    """penalty 5e-324 is 0 in float32: a repeated id with a positive logit gets +inf. Those ids share the
    draw (no NaN, no id past the vocabulary), whatever the truncation."""
    logits = _random_logits(1, 7).abs()  # every logit positive
    repeated = [3, 9, 40]
    for extreme in [
        {"temperature": 0.7, "repetition_penalty": 5e-324},
        {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1e-40},
        {"temperature": 1.0, "top_k": 5, "repetition_penalty": 5e-324},
    ]:
        rows = [_row(SamplingParams(seed=seed, **extreme), prompt_ids=repeated) for seed in range(64)]
        drawn = set(sampler.sample(logits.expand(len(rows), VOCAB), rows).token_ids)
        assert drawn <= set(repeated) and len(drawn) > 1


def test_a_row_without_mass_still_gets_an_id_in_the_vocabulary() -> None:
    probs = torch.tensor([[0.0, 0.0, 0.0], [float("nan")] * 3, [0.0, 1.0, 0.0]])
    assert sample_from_probs(probs, torch.tensor([0.5, 0.5, 0.5])).tolist() == [2, 2, 1]


_TINY = st.floats(min_value=5e-324, max_value=1e-30)  # subnormal and tiny: 0 or denormal in float32


@st.composite
def _extreme_rows(draw: st.DrawFn) -> tuple[torch.Tensor, list[SamplingRow]]:
    """1-4 rows of any settings SamplingParams accepts, over logits with huge, tiny and -inf values."""
    num_rows = draw(st.integers(1, 4))
    values = st.one_of(
        st.floats(-30, 30), st.sampled_from([float("-inf"), 3e38, -3e38, 1e-40, 0.0]), st.floats(-1e6, 1e6)
    )
    logits = torch.tensor(draw(st.lists(values, min_size=num_rows * VOCAB, max_size=num_rows * VOCAB)))
    logits = logits.view(num_rows, VOCAB)
    logits[:, 0] = torch.where(logits[:, 0] == float("-inf"), 0.0, logits[:, 0])  # a row keeps one id
    rows = []
    for _ in range(num_rows):
        params = SamplingParams(
            temperature=draw(st.one_of(st.just(0.0), _TINY, st.floats(1e-6, 1e30))),
            top_p=draw(st.one_of(st.just(1.0), _TINY, st.floats(1e-6, 1.0))),
            top_k=draw(st.integers(-1, VOCAB + 5)),
            repetition_penalty=draw(st.one_of(st.just(1.0), _TINY, st.floats(1e-6, 1e30))),
            presence_penalty=draw(st.floats(-2, 2)),
            frequency_penalty=draw(st.floats(-2, 2)),
            min_tokens=draw(st.integers(0, 2)),
            max_tokens=4,
            stop_token_ids=tuple(draw(st.lists(st.integers(0, VOCAB + 3), max_size=3))),
            logprobs=draw(st.one_of(st.none(), st.integers(0, 5))),
            seed=draw(st.integers(0, 2**32)),
        )
        history = draw(st.lists(st.integers(0, VOCAB - 1), max_size=6))
        rows.append(_row(params, output_ids=history[3:], prompt_ids=history[:3] or (1,)))
    return logits, rows


@settings(max_examples=150, deadline=None)
@given(case=_extreme_rows())
def test_any_accepted_settings_give_an_id_of_the_vocabulary(case: tuple) -> None:
    """Whatever SamplingParams accepts, over whatever logits a model gives (huge, tiny, -inf), every row
    gets an id of the vocabulary: no exception, no id past the end."""
    logits, rows = case
    result = Sampler(vocab_size=VOCAB, eos_token_id=EOS, device=CPU).sample(logits, rows)
    assert len(result.token_ids) == len(rows)
    assert all(0 <= token < VOCAB for token in result.token_ids)


# --- logprobs -----------------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_distribution(sampler: Sampler) -> None:
    logits = _random_logits(4, seed=9)
    rows = [
        _row(SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.4, logprobs=5), [4, 4]),
        _row(SamplingParams(temperature=0.0, logprobs=0)),
        _row(SamplingParams(temperature=1.0)),
        _row(SamplingParams(temperature=1.0, logprobs=20, seed=3)),
    ]
    result = sampler.sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert result.logprobs[2] is None
    for i, n in ((0, 5), (1, 0), (3, 20)):
        entry = result.logprobs[i]
        assert entry is not None
        chosen, top = entry
        assert math.isclose(chosen, raw[i, result.token_ids[i]].item(), rel_tol=0, abs_tol=1e-6)
        assert len(top) == n
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        expected = raw[i].topk(n) if n else None
        if expected is not None:
            assert [t for t, _ in top] == expected.indices.tolist()
            torch.testing.assert_close(torch.tensor(values), expected.values)
    assert result.logprobs[1] == (pytest.approx(raw[1].max().item()), [])
