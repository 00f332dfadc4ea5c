"""Upload an export to the Hugging Face Hub. Every precondition (online, a token) is checked before anything is
written; the export goes to a temporary folder that is removed afterwards, and the upload is one commit, so a
failure leaves nothing half-written either here or on the Hub."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mol.errors import StorageError


class PushError(StorageError):
    """The export cannot be uploaded: offline, no token, or the Hub refused it."""


def hub_token(token: str | None = None) -> str:
    """The token to upload with, or PushError saying why there is none (checked before any work is done)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # huggingface_hub's reading of HF_HUB_OFFLINE, looked up at call time
        raise PushError(
            "Cannot push: the Hub is switched off here (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE and "
            "run `hf auth login` (or set HF_TOKEN), or export to a folder with `mol export` and upload "
            "it later."
        )
    if token:
        return token
    try:
        from huggingface_hub import get_token

        found = get_token()
    except Exception:  # a broken token file is the same as none
        found = None
    if not found:
        raise PushError(
            "Cannot push: no Hugging Face token. Run `hf auth login`, set HF_TOKEN, or pass --token."
        )
    return found


def push(
    recipe_or_model: Any,
    repo_id: str,
    weights: str | Path | None = None,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    **export_options: Any,
) -> str:
    """Export `recipe_or_model` (or upload an already exported folder) to the Hub repo `repo_id`; returns the commit URL."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"'{repo_id}' is not a Hub repository id; write it as 'user-or-org/name'.")
    token = hub_token(token)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    folder = Path(recipe_or_model) if isinstance(recipe_or_model, str | Path) else None
    with tempfile.TemporaryDirectory(prefix="mol-push-") as tmp:
        if folder is None or not (folder / "config.json").is_file():
            from mol.export import export

            folder = export(recipe_or_model, Path(tmp) / "model", weights, **export_options).path
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                repo_type="model",
                commit_message=commit_message or "Upload a model fused with Mango",
            )
        except Exception as exc:  # network, permissions, quota: the client raises many kinds
            raise PushError(
                f"Uploading to '{repo_id}' failed: {type(exc).__name__}: {exc}".rstrip(".") + "."
            ) from None
    return str(getattr(info, "commit_url", None) or repo_id)
