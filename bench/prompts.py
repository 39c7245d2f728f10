"""Benchmark prompts: the real ChatMed questions (JSONL `query` fields) or random Chinese text.

The data files live outside the project (../shared/data/chatmed by default); every reader takes the path
as an argument and never assumes the file is there.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

# The ChatMed inference prompt is `<s>问：\n{question}\n答：\n` (CHATMED.md); the files store it whole.
CHATMED_PREFIX = "问：\n"
CHATMED_SUFFIX = "\n答：\n"
BOS_TEXT = "<s>"
DEFAULT_DATA_DIR = Path("../shared/data/chatmed")
CONSULT_FILE = "ChatMed-Consult_test.json"
TCM_FILE = "ShenNong-TCM_test.jsonl"
CONSULT_ADAPTER = "chatmed-consult"
TCM_ADAPTER = "chatmed-tcm"

# Common CJK characters (U+4E00..U+9FA5) for random prompts that exercise the same tokenizer paths.
_CJK_FIRST = 0x4E00
_CJK_LAST = 0x9FA5


def strip_chatmed_template(query: str) -> str:
    """The bare question of a templated ChatMed query; text without the template is returned as is."""
    text = query.removeprefix(BOS_TEXT)
    if text.startswith(CHATMED_PREFIX) and text.endswith(CHATMED_SUFFIX):
        return text[len(CHATMED_PREFIX) : len(text) - len(CHATMED_SUFFIX)]
    return query


def load_questions(path: Path) -> list[str]:
    """The questions of a JSONL file whose objects carry a templated `query` field, in file order."""
    questions: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                query = record["query"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'query' field") from exc
            if not isinstance(query, str):
                raise ValueError(f"{path}:{line_no}: 'query' must be a string")
            questions.append(strip_chatmed_template(query))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def interleave(groups: Sequence[Sequence[str]]) -> list[str]:
    """Round-robin merge (a0, b0, a1, b1, ...) until the shortest group runs out.

    Stopping at the shortest keeps the mix exactly even, so prompt i pairs with model i mod k when
    models are assigned round-robin too.
    """
    if not groups:
        return []
    shortest = min(len(group) for group in groups)
    return [group[i] for i in range(shortest) for group in groups]


def cycle_to(items: Sequence[str], count: int) -> list[str]:
    """The first `count` items of `items` repeated as often as needed."""
    if not items:
        raise ValueError("no items to repeat")
    return [items[i % len(items)] for i in range(count)]


def random_questions(count: int, num_chars: int, seed: int) -> list[str]:
    """`count` strings of `num_chars` random common CJK characters, reproducible from `seed`."""
    rng = random.Random(seed)
    return ["".join(chr(rng.randint(_CJK_FIRST, _CJK_LAST)) for _ in range(num_chars)) for _ in range(count)]


def load_mixed_chatmed(data_dir: Path) -> list[tuple[str, str]]:
    """(question, adapter) pairs alternating Consult and TCM questions, 50/50.

    Consult questions go to `chatmed-consult` and TCM questions to `chatmed-tcm`, as the data README asks.
    """
    consult = load_questions(data_dir / CONSULT_FILE)
    tcm = load_questions(data_dir / TCM_FILE)
    questions = interleave([consult, tcm])
    adapters = [CONSULT_ADAPTER, TCM_ADAPTER]
    return [(question, adapters[i % 2]) for i, question in enumerate(questions)]


def load_dataset_files(paths: Iterable[Path]) -> list[str]:
    """Questions from one or more JSONL files, interleaved file by file."""
    return interleave([load_questions(path) for path in paths])
