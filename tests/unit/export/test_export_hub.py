"""Hub push, tested at the huggingface_hub boundary: HfApi methods are replaced, nothing reaches the network."""

import logging

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from medusa_train.export import hub
from medusa_train.export.hub import HubAuthError, HubConnectionError, plan_upload, push_to_hub

try:  # the HTTP client huggingface_hub is built on
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

SECRET = "hf_TESTsecretTOKENdoNOTprint123"


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2048)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "junk").write_text("no")
    return tmp_path


@pytest.fixture
def calls(monkeypatch):
    """Record HfApi.create_repo / upload_folder calls (and the token the HfApi was made with)."""
    record = []

    def create_repo(self, repo_id, **kwargs):
        record.append(("create_repo", self.token, repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        record.append(("upload_folder", self.token, kwargs["repo_id"], kwargs))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return record


def test_plan_lists_files_and_sizes(folder):
    plan = plan_upload(folder, "me/heads", private=True)
    assert plan.files == [("config.json", 2), ("eval/results.json", 2), ("model.safetensors", 2048)]
    assert plan.total_bytes == 2052
    text = plan.describe()
    assert "https://huggingface.co/me/heads (private)" in text and "2.0 KB  model.safetensors" in text
    with pytest.raises(ValueError, match="user/name"):
        plan_upload(folder, "no-namespace")


def test_dry_run_makes_no_calls(folder, calls, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with caplog.at_level(logging.INFO):
        plan = push_to_hub(folder, "me/heads", dry_run=True)
    assert calls == [] and len(plan.files) == 3
    assert "would upload 3 files" in caplog.text and "Hub token: found" in caplog.text
    assert SECRET not in caplog.text


def test_push_calls_the_hub_api(folder, calls, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)  # read through huggingface_hub.get_token()
    with caplog.at_level(logging.DEBUG):
        url = push_to_hub(folder, "me/heads", private=True, commit_message="heads v1")
    assert url == "https://huggingface.co/me/heads"
    (c_name, c_token, c_repo, c_kwargs), (u_name, u_token, u_repo, u_kwargs) = calls
    assert (c_name, c_repo, c_kwargs) == ("create_repo", "me/heads", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert (u_name, u_repo) == ("upload_folder", "me/heads")
    assert u_kwargs["folder_path"] == str(folder) and u_kwargs["commit_message"] == "heads v1"
    assert u_kwargs["repo_type"] == "model" and ".*" in u_kwargs["ignore_patterns"]
    assert c_token == u_token == SECRET  # handed to HfApi ...
    out = capsys.readouterr()
    assert SECRET not in caplog.text + out.out + out.err  # ... and shown nowhere


def test_no_token_is_a_clear_error(folder, calls, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(HubAuthError, match="HF_TOKEN"):
        push_to_hub(folder, "me/heads")
    assert calls == []


def _raise(exc):
    def method(self, *args, **kwargs):
        raise exc
    return method


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_token(folder, monkeypatch, status):
    monkeypatch.setattr(hub, "get_token", lambda: SECRET)
    response = httpx.Response(status, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    monkeypatch.setattr(HfApi, "create_repo", _raise(HfHubHTTPError(f"{status} Client Error", response=response)))
    with pytest.raises(HubAuthError, match=f"HTTP {status}") as e:
        push_to_hub(folder, "me/heads")
    assert SECRET not in str(e.value)


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
    OfflineModeIsEnabled("offline"),
    ConnectionError("refused"),
])
def test_offline(folder, monkeypatch, exc):
    monkeypatch.setattr(hub, "get_token", lambda: SECRET)
    monkeypatch.setattr(HfApi, "create_repo", _raise(exc))
    with pytest.raises(HubConnectionError, match="could not reach the Hugging Face Hub"):
        push_to_hub(folder, "me/heads")


def test_other_errors_pass_through(folder, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: SECRET)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: "url")
    monkeypatch.setattr(HfApi, "upload_folder", _raise(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        push_to_hub(folder, "me/heads")
