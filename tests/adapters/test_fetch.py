"""chatmed-fetch: fails fast and helpfully offline, downloads into the served layout, and checks a base
folder (built here by the demo builder) and the adapters against it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.demo import DemoModel
from server import fetch
from server.fetch import CHATMED_ADAPTERS, EXIT_CHECK_FAILED, EXIT_OFFLINE, EXIT_OK, FetchError, check_base
from tests.adapters.conftest import AdapterTree

REPO = Path(__file__).resolve().parents[2]
SUBPROCESS_TIMEOUT_S = 120


def _demo_vocab(demo: DemoModel) -> int:
    from engine.model.llama import LlamaArgs

    return LlamaArgs.from_folder(demo.base_path).vocab_size


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_fetch(home: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m server.fetch` as a user would run it, bounded in time, with a clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "server.fetch", *args],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def test_offline_mode_fails_at_once_and_says_what_to_put_where(tmp_path: Path) -> None:
    done = _run_fetch(tmp_path, ["--adapters-dir", str(tmp_path / "adapters")], HF_HUB_OFFLINE="1")
    assert done.returncode == EXIT_OFFLINE, done.stderr
    for _, repo in CHATMED_ADAPTERS:
        assert f"hf download {repo}" in done.stderr
    assert str(tmp_path / "adapters") in done.stderr and "--skip-download" in done.stderr
    assert not (tmp_path / "adapters").exists()


def test_an_unreachable_hub_fails_fast(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{_closed_port()}"  # nothing listens there
    done = _run_fetch(tmp_path, ["--adapters-dir", str(tmp_path), "--endpoint", closed, "--timeout-s", "5"])
    assert done.returncode == EXIT_OFFLINE, done.stderr
    assert f"The model hub {closed} cannot be used here" in done.stderr
    assert "hf download michaelwzhu/ChatMed-Consult" in done.stderr


def test_the_base_check_accepts_a_good_base(demo: DemoModel) -> None:
    summary = check_base(demo.base_path, expected_vocab_size=_demo_vocab(demo))
    assert f"vocabulary {_demo_vocab(demo)}" in summary and "LLaMA" in summary


def test_the_base_check_wants_the_chatmed_vocabulary(demo: DemoModel) -> None:
    with pytest.raises(FetchError, match=f"vocab_size {_demo_vocab(demo)}; the ChatMed adapters need 49954"):
        check_base(demo.base_path)


@pytest.mark.parametrize(
    ("remove", "fragment"),
    [
        (("config.json",), "no config.json"),
        (("tokenizer.json", "tokenizer_config.json"), "no usable tokenizer"),
        (("model.safetensors",), "no model.safetensors"),
    ],
)
def test_the_base_check_names_what_is_missing(
    demo: DemoModel, tmp_path: Path, remove: tuple[str, ...], fragment: str
) -> None:
    base = Path(shutil.copytree(demo.base_path, tmp_path / "base"))
    for name in remove:
        (base / name).unlink()
    with pytest.raises(FetchError, match=fragment):
        check_base(base, expected_vocab_size=_demo_vocab(demo))


def _fake_download(source: dict[str, Path]) -> Any:
    """Stands in for huggingface_hub.snapshot_download: copies a demo adapter where it was asked."""
    repos = {repo: name for name, repo in CHATMED_ADAPTERS}

    def download(repo_id: str, *, local_dir: Path, allow_patterns: list[str], **_: Any) -> str:
        assert "adapter_config.json" in allow_patterns and "adapter_model.bin" in allow_patterns
        shutil.copytree(source[repos[repo_id]], local_dir, dirs_exist_ok=True)
        return str(local_dir)

    return download


def test_a_download_lands_in_the_served_layout_and_passes_the_checks(
    demo: DemoModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import huggingface_hub

    monkeypatch.setattr(fetch, "check_hub", lambda options: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_download(demo.adapters))
    adapters = tmp_path / "adapters"
    argv = ["--adapters-dir", str(adapters), "--base", str(demo.base_path)]
    argv += ["--expected-vocab-size", str(_demo_vocab(demo))]
    with caplog.at_level("INFO", logger="server.fetch"):
        assert fetch.main(argv) == EXIT_OK
    for name, _ in CHATMED_ADAPTERS:
        assert (adapters / name / "adapter_config.json").is_file()
    assert "all checks passed" in caplog.text
    assert f"--adapter chatmed-consult={adapters / 'chatmed-consult'}" in caplog.text


def test_adapters_that_do_not_fit_the_base_are_reported(
    demo: DemoModel, adapter_tree: AdapterTree, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapters = tmp_path / "adapters"
    shutil.copytree(demo.adapters["chatmed-consult"], adapters / "chatmed-consult")
    shutil.copytree(adapter_tree.path("wrong-shape"), adapters / "chatmed-tcm")
    argv = ["--skip-download", "--adapters-dir", str(adapters), "--base", str(demo.base_path)]
    argv += ["--expected-vocab-size", str(_demo_vocab(demo))]
    assert fetch.main(argv) == EXIT_CHECK_FAILED
    assert "chatmed-tcm cannot be served on" in caplog.text and "do not match the base" in caplog.text
    shutil.rmtree(adapters / "chatmed-tcm")
    shutil.copytree(adapter_tree.path("modules-to-save"), adapters / "chatmed-tcm")
    assert fetch.main(argv) == EXIT_CHECK_FAILED
    assert "modules_to_save" in caplog.text
    shutil.rmtree(adapters / "chatmed-tcm")
    assert fetch.main(argv) == EXIT_CHECK_FAILED
    assert "no adapter_config.json" in caplog.text
