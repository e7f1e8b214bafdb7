"""Download an HF hub repository's config, tokenizer and safetensors weights (never pickled weights)."""

from __future__ import annotations

from pathlib import Path

from slimlm.checkpoint.materialize import CheckpointError

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def download(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Return a local folder with the repo's files, fetching what the local HF cache lacks."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the HF hub ({type(e).__name__}: {e}); "
            "check the id and your network, or pass a local folder or .gguf file"
        ) from None
