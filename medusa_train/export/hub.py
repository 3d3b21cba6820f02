"""Push an export folder to the Hugging Face Hub, or list what a push would upload.

The token comes from `HF_TOKEN` or the cached `hf auth login`, through huggingface_hub's own
`get_token()`. It goes to `HfApi(token=...)` and nowhere else: it is never printed, logged or put into
an error message.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = {"ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "TransportError",
                      "Timeout", "TimeoutException", "OfflineModeIsEnabled", "ProxyError", "SSLError"}


class HubError(RuntimeError):
    """A push that could not happen; the message says why and what to do."""


class HubAuthError(HubError):
    pass


class HubConnectionError(HubError):
    pass


@dataclass
class UploadPlan:
    repo_id: str
    private: bool
    folder: Path
    files: list[tuple[str, int]]  # (path in repo, bytes)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        visibility = "private" if self.private else "public"
        lines = [f"would upload {len(self.files)} files ({_size(self.total_bytes)}) from {self.folder} "
                 f"to https://huggingface.co/{self.repo_id} ({visibility}):"]
        lines += [f"  {_size(size):>10}  {name}" for name, size in self.files]
        return "\n".join(lines)


def plan_upload(folder: str | Path, repo_id: str, private: bool = False) -> UploadPlan:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"nothing to upload: {folder} is not a folder")
    _check_repo_id(repo_id)
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return UploadPlan(repo_id=repo_id, private=private, folder=folder, files=files)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: bool = False,
    commit_message: str | None = None,
) -> UploadPlan | str:
    """Create `repo_id` if needed and upload `folder`; returns the repo URL. dry_run: the plan, no network."""
    plan = plan_upload(folder, repo_id, private)
    if dry_run:
        token_state = "found" if get_token() else "NOT found (set HF_TOKEN or run `hf auth login` before pushing)"
        log.info("%s\nHub token: %s", plan.describe(), token_state)
        return plan
    token = get_token()
    if not token:
        raise HubAuthError(
            "not logged in to the Hugging Face Hub: set the HF_TOKEN environment variable to a token with write "
            "access, or run `hf auth login`"
        )
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(plan.folder),
            repo_type="model",
            commit_message=commit_message or f"Upload Medusa heads with medusa_train ({len(plan.files)} files)",
            ignore_patterns=[".*", "**/.*"],
        )
    except Exception as e:  # noqa: BLE001 - classified below, re-raised unchanged otherwise
        raise _classify(e, repo_id) from None
    log.info("uploaded %d files (%s) to %s", len(plan.files), _size(plan.total_bytes), url)
    return str(url)


def _classify(e: Exception, repo_id: str) -> Exception:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return HubAuthError(
            f"the Hugging Face Hub refused the token (HTTP {status}) for {repo_id}: it is invalid, expired, "
            "read-only, or has no rights to that namespace. Set HF_TOKEN to a write token or run `hf auth login`"
        )
    names = {c.__name__ for c in type(e).__mro__}
    if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or names & _CONNECTION_ERRORS:
        return HubConnectionError(
            f"could not reach the Hugging Face Hub to push {repo_id} ({type(e).__name__}): offline, behind a "
            "proxy, or HF_HUB_OFFLINE=1? The export folder is complete; push it later with hub.push=true"
        )
    return e


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/") if repo_id else []
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"hub.repo_id must look like user/name or org/name, got {repo_id!r}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
