"""The child process of an upload (`upload.upload_plan`): it imports huggingface_hub alone, so it starts in a second.

huggingface_hub sends every request through one shared client whose timeout is None; here that client gets a
per-read timeout (a silent server fails the request), and the parent kills this process at the total deadline.
"""

from __future__ import annotations

from huggingface_hub import CommitOperationAdd, HfApi, get_session

READ_TIMEOUT = 60.0  # seconds one request may wait for the next bytes (huggingface_hub's default: forever)


def upload_in_child(send, repo_id, files, private, token, commit_message, read_timeout) -> None:
    """Create the repo and commit `files` (`(path in repo, local path or bytes)`); messages to the parent: ("ready",
    None) once started, then ("ok", result) or ("error", one line)."""
    send.send(("ready", None))
    try:
        get_session().timeout = read_timeout  # the client every huggingface_hub request goes through
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source) for name, source in files]
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message)
        send.send(("ok", {"url": str(url), "commit_url": info.commit_url, "commit_oid": info.oid}))
    except Exception as err:  # noqa: BLE001 - whatever huggingface_hub or the network raise becomes one line
        send.send(("error", f"{type(err).__name__}: {_first_line(err)}"))
    finally:
        send.close()


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return text if len(text) <= limit else text[: limit - 3] + "..."
