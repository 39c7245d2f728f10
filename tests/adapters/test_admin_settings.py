"""The hot-swap flags: --admin-api-key, --adapters-root, --max-loras, --max-cpu-loras, --max-lora-rank,
as flags and CHATMED_* variables, and the start-up refusals of inconsistent values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.settings import Settings
from tests.adapters.conftest import AdapterTree


def test_admin_flags_and_variables(adapter_tree: AdapterTree, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--admin-api-key", "k1", "--adapters-root", str(adapter_tree.root), "--max-loras", "1"]
    argv += ["--max-cpu-loras", "3", "--max-lora-rank", "16"]
    settings = Settings.from_args(argv)
    assert settings.admin_api_key is not None and settings.admin_api_key.get_secret_value() == "k1"
    assert "k1" not in repr(settings)
    config = settings.engine_config(adapter_tree.root, ())
    assert (config.max_loras, config.max_cpu_loras, config.max_lora_rank) == (1, 3, 16)
    assert Settings.from_args(["--max-loras", "20"]).engine_config(adapter_tree.root, ()).max_cpu_loras == 20
    monkeypatch.setenv("CHATMED_ADMIN_API_KEY", "k2")
    monkeypatch.setenv("CHATMED_ADAPTERS_ROOT", str(adapter_tree.root))
    from_env = Settings.from_args([])
    assert from_env.admin_api_key is not None and from_env.admin_api_key.get_secret_value() == "k2"
    assert from_env.adapters_root == adapter_tree.root


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--admin-api-key", "k"], "--adapters-root"),
        (["--admin-api-key", "k", "--adapters-root", "/no/such/folder"], "existing folder"),
        (["--admin-api-key", " ", "--adapters-root", "."], "must not be empty"),
        (["--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras"),
        (["--max-lora-rank", "0"], "max_lora_rank"),
    ],
)
def test_bad_admin_flags_stop_the_start_up(argv: list[str], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        Settings.from_args(argv)
