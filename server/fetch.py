"""`chatmed-fetch`: download the published ChatMed adapters and check them, and a base folder, before serving.

    chatmed-fetch --adapters-dir models/adapters --base models/base

Where a model hub is reachable, downloads `michaelwzhu/ChatMed-Consult` and `michaelwzhu/ShenNong-TCM-LLM`
(adapter files only) with huggingface_hub into `<adapters-dir>/chatmed-consult` and `.../chatmed-tcm`.
Offline (HF_HUB_OFFLINE=1, or the hub does not answer within --timeout-s) it stops at once and says what
to put where. `--skip-download` checks folders already in place. The base check reads config.json and the
tokenizer (vocabulary 49954, as the adapters were trained with) and then reads each adapter against the
base exactly as the server will, so a mismatch shows here rather than at start-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# (served name, Hugging Face repository) of the published adapters (see CHATMED.md).
CHATMED_ADAPTERS = (
    ("chatmed-consult", "michaelwzhu/ChatMed-Consult"),
    ("chatmed-tcm", "michaelwzhu/ShenNong-TCM-LLM"),
)
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.bin", "adapter_model.safetensors", "README.md")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Chinese-LLaMA-Alpaca Plus: 49953 pieces + the pad token appended for training.
CHATMED_VOCAB_SIZE = 49954
DEFAULT_HUB = "https://huggingface.co"
EXIT_OK, EXIT_CHECK_FAILED, EXIT_OFFLINE = 0, 1, 2
DESCRIPTION = "Download the published ChatMed adapters and check them, and a base folder, before serving."


class FetchError(Exception):
    """A failure with a message for the person at the terminal and the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = EXIT_CHECK_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class FetchOptions:
    """The command's flags, typed."""

    adapters_dir: Path
    base: Path | None
    skip_download: bool
    endpoint: str
    timeout_s: float
    expected_vocab_size: int
    max_lora_rank: int


def offline_help(options: FetchOptions, reason: str) -> str:
    """What to do without a hub: fetch elsewhere, copy here, check."""
    lines = [
        f"The model hub {options.endpoint} cannot be used here ({reason}).",
        "On a machine with internet access, run (pip install huggingface_hub):",
    ]
    lines += [f"    hf download {repo} --local-dir {name}" for name, repo in CHATMED_ADAPTERS]
    lines += [
        f"then copy both folders into {options.adapters_dir}/ (each must hold adapter_config.json and",
        "adapter_model.bin or adapter_model.safetensors), and check them with:",
        f"    chatmed-fetch --skip-download --adapters-dir {options.adapters_dir} --base models/base",
    ]
    return "\n".join(lines)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in {
        "1",
        "true",
        "yes",
    }


def check_hub(options: FetchOptions) -> None:
    """Fail fast (EXIT_OFFLINE) when the hub is off or does not answer within timeout_s."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        raise FetchError(
            "huggingface_hub is not installed: pip install 'chatmed-serve[fetch]'", EXIT_OFFLINE
        ) from None
    if _hub_offline():
        raise FetchError(offline_help(options, "HF_HUB_OFFLINE is set"), EXIT_OFFLINE)
    api = HfApi(endpoint=options.endpoint)
    repo = CHATMED_ADAPTERS[0][1]
    try:
        api.model_info(repo, timeout=options.timeout_s)
    except RepositoryNotFoundError:
        raise FetchError(f"the hub at {options.endpoint} does not have {repo}") from None
    except Exception as e:  # DNS, refused, TLS, timeouts, proxies: all mean "no hub from here"
        raise FetchError(offline_help(options, type(e).__name__), EXIT_OFFLINE) from None


def download_adapters(options: FetchOptions) -> None:
    """Download each published adapter's files into adapters_dir/<served name>."""
    from huggingface_hub import snapshot_download

    for name, repo in CHATMED_ADAPTERS:
        target = options.adapters_dir / name
        logger.info("downloading %s into %s", repo, target)
        try:
            snapshot_download(
                repo,
                local_dir=target,
                allow_patterns=list(ADAPTER_PATTERNS),
                endpoint=options.endpoint,
                etag_timeout=options.timeout_s,
            )
        except Exception as e:
            raise FetchError(offline_help(options, f"{repo}: {type(e).__name__}"), EXIT_OFFLINE) from None


def check_adapter_config(folder: Path) -> str:
    """A one-line summary of a plain LoRA adapter folder; FetchError when it cannot share a base."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise FetchError(f"{folder} has no adapter_config.json")
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FetchError(f"{folder} has no adapter_model.safetensors or adapter_model.bin")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FetchError(f"{config_file} cannot be read ({type(e).__name__})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise FetchError(f"{folder} is not a LoRA adapter")
    if config.get("modules_to_save"):
        raise FetchError(f"{folder} has modules_to_save: it cannot share the base with other adapters")
    targets = config.get("target_modules")
    return f"r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, target_modules={targets}"


def check_base(base: Path, expected_vocab_size: int = CHATMED_VOCAB_SIZE) -> str:
    """A one-line summary of a LLaMA base folder; FetchError when config, tokenizer or weights are missing,
    the model is not a LLaMA, or the vocabulary is not the adapters' (49954 for ChatMed)."""
    from engine import Tokenizer  # torch and transformers: only for the checks, not the offline path
    from engine.model.llama import LlamaArgs

    if not (base / "config.json").is_file():
        raise FetchError(
            f"{base} has no config.json: build the base first (README: Serving the real weights)"
        )
    try:
        args = LlamaArgs.from_folder(base)
    except (OSError, ValueError) as e:
        raise FetchError(f"{base}/config.json is not a usable LLaMA config: {e}") from None
    if args.vocab_size != expected_vocab_size:
        raise FetchError(
            f"{base} has vocab_size {args.vocab_size}; the ChatMed adapters need {expected_vocab_size} "
            "(LLaMA-7B merged with Chinese-LLaMA-Plus and Chinese-Alpaca-Plus)"
        )
    try:
        tokenizer = Tokenizer(base)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise FetchError(f"{base} has no usable tokenizer ({type(e).__name__})") from None
    if tokenizer.vocab_size != args.vocab_size:
        raise FetchError(
            f"{base}: the tokenizer has {tokenizer.vocab_size} tokens, config.json {args.vocab_size}"
        )
    if not any((base / f).is_file() for f in WEIGHT_FILES):
        raise FetchError(f"{base} has no model.safetensors or pytorch_model.bin (or their index)")
    return f"LLaMA, {args.num_layers} layers, hidden {args.hidden_size}, vocabulary {args.vocab_size}"


def check_adapter_on_base(folder: Path, base: Path, max_lora_rank: int) -> None:
    """Read the adapter against the base as the server will (targets, shapes, rank)."""
    import torch

    from engine.errors import AdapterError
    from engine.lora import read_adapter
    from engine.model.llama import LlamaArgs

    try:
        read_adapter(folder.name, folder, LlamaArgs.from_folder(base), max_lora_rank, torch.float32)
    except AdapterError as e:
        raise FetchError(f"{folder} cannot be served on {base}: {e.message}") from None


def run(options: FetchOptions) -> None:
    """Download (unless skipped), then check every adapter folder and the base when given."""
    if not options.skip_download:
        check_hub(options)
        download_adapters(options)
    folders = [options.adapters_dir / name for name, _ in CHATMED_ADAPTERS]
    for folder in folders:
        logger.info("%s: %s", folder.name, check_adapter_config(folder))
    if options.base is None:
        logger.info("no --base given: the base folder was not checked")
        return
    logger.info("base %s: %s", options.base, check_base(options.base, options.expected_vocab_size))
    for folder in folders:
        check_adapter_on_base(folder, options.base, options.max_lora_rank)
    adapters = " ".join(f"--adapter {folder.name}={folder}" for folder in folders)
    logger.info(
        "all checks passed; serve with:\n    chatmed-serve --base-model %s %s", options.base, adapters
    )


def parse_options(argv: list[str] | None) -> FetchOptions:
    parser = argparse.ArgumentParser(prog="chatmed-fetch", description=DESCRIPTION)
    parser.add_argument(
        "--adapters-dir", type=Path, default=Path("models/adapters"), help="where adapters go"
    )
    parser.add_argument("--base", type=Path, default=None, help="a base folder to check against the adapters")
    parser.add_argument("--skip-download", action="store_true", help="only check the folders already there")
    parser.add_argument(
        "--endpoint", default=os.environ.get("HF_ENDPOINT", DEFAULT_HUB), help="the model hub"
    )
    parser.add_argument("--timeout-s", type=float, default=10.0, help="seconds to wait for the hub to answer")
    parser.add_argument("--expected-vocab-size", type=int, default=CHATMED_VOCAB_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--max-lora-rank", type=int, default=64, help="as the server's --max-lora-rank")
    ns = parser.parse_args(argv)
    return FetchOptions(
        adapters_dir=ns.adapters_dir.expanduser(),
        base=ns.base.expanduser() if ns.base is not None else None,
        skip_download=ns.skip_download,
        endpoint=ns.endpoint.rstrip("/"),
        timeout_s=ns.timeout_s,
        expected_vocab_size=ns.expected_vocab_size,
        max_lora_rank=ns.max_lora_rank,
    )


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit code (0 ok, 1 a check failed, 2 no hub)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    options = parse_options(argv)
    try:
        run(options)
    except FetchError as e:
        logger.error("chatmed-fetch: %s", e.message)
        return e.exit_code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
