"""The run-state rules every stage shares (`speculators_hf.runstate`): start, resume, finished, refuse, overwrite only
what a run wrote, never a user's file, never finished on a non-finite or empty result."""

import json
import os

import pytest

from speculators_hf.runstate import STATE_DIR, changed_keys, claim, file_signature, read_manifest, require_complete
from speculators_hf.utils import RunFailed, UserError
from speculators_hf.validation import require_file, resolve_inside


def test_fresh_finished_resumed(tmp_path):
    out = tmp_path / "out"
    run = claim(out, "datagen", {"lr": 1})
    assert run.state == "fresh"
    run.path("a.json").write_text("1")
    run.finish({"samples": 3}, produced=3)
    again = claim(out, "datagen", {"lr": 1})
    assert again.finished and again.result == {"samples": 3}
    (out / "a.json").unlink()  # an entry gone: the run resumes (and rewrites it)
    assert claim(out, "datagen", {"lr": 1}).resumed


def test_other_inputs_are_refused_and_overwrite_deletes_only_recorded_entries(tmp_path):
    out = tmp_path / "out"
    run = claim(out, "evaluate", {"k": 3, "data": {"path": "x", "sha": "1"}}, owned=False)
    run.path("card.json").write_text("{}")
    (out / ".card.json.abc.tmp").write_text("torn")  # a temp file left by a kill: ours too
    (out / "user.txt").write_text("keep me")
    (out / ".card.json.notes").write_text("a user's hidden file beside ours: not ours")
    with pytest.raises(UserError, match=r"other inputs \(data.sha, k changed\)"):
        claim(out, "evaluate", {"k": 4, "data": {"path": "x", "sha": "2"}}, owned=False)
    assert (out / "card.json").exists()
    claim(out, "evaluate", {"k": 4}, owned=False, overwrite=True)
    assert not (out / "card.json").exists() and not (out / ".card.json.abc.tmp").exists()
    assert (out / "user.txt").read_text() == "keep me" and (out / ".card.json.notes").exists()


def test_replace_stale_replaces_without_asking_but_keeps_same_inputs(tmp_path):
    run = claim(tmp_path, "train", {"lr": 1})
    run.path("checkpoint-1").mkdir()
    run.finish()
    assert claim(tmp_path, "train", {"lr": 1}, replace_stale=True).finished
    fresh = claim(tmp_path, "train", {"lr": 2}, replace_stale=True)
    assert fresh.state == "fresh" and not (tmp_path / "checkpoint-1").exists()


def test_an_owned_folder_with_other_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "index.json").write_text("mine")
    (tmp_path / "data_0.pt").write_text("mine too")
    with pytest.raises(UserError, match=r"did not write \(data_0.pt, index.json\)"):
        claim(tmp_path, "datagen", {}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_0.pt", "index.json"]


def test_a_shared_folder_never_replaces_a_users_file(tmp_path):
    (tmp_path / "config.json").write_text("the user's")
    run = claim(tmp_path, "export", {}, owned=False)
    with pytest.raises(UserError, match="config.json exists and was not written by speculators_hf"):
        run.path("config.json")
    assert (tmp_path / "config.json").read_text() == "the user's"
    run.path("model.safetensors").write_text("x")  # a new name is fine
    assert read_manifest(tmp_path, "export")["entries"] == ["model.safetensors"]


def test_entries_written_by_another_stage_are_ours(tmp_path):
    claim(tmp_path, "datagen", {}).path("data-00000.safetensors").write_text("x")
    vocab = claim(tmp_path, "vocab", {})  # the folder holds only recorded entries: not foreign
    vocab.path("d2t.npy").write_text("x")
    assert claim(tmp_path, "datagen", {}).resumed


def test_finish_refuses_non_finite_and_empty_results(tmp_path):
    run = claim(tmp_path, "train", {})
    with pytest.raises(RunFailed, match=r"non-finite value \(metrics.loss\)"):
        run.finish({"metrics": {"loss": float("nan")}})
    with pytest.raises(RunFailed, match="produced no samples"):
        run.finish({"samples": 0}, produced=0, what="samples")
    assert read_manifest(tmp_path, "train")["status"] == "running"
    assert claim(tmp_path, "train", {}).resumed


def test_entry_names_stay_inside_the_folder(tmp_path):
    run = claim(tmp_path, "x", {})
    for bad in ("../escape", "a/b", "..", STATE_DIR, ""):
        with pytest.raises(ValueError):
            run.path(bad)


def test_deleting_a_symlinked_entry_removes_the_link_not_its_target(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "f").write_text("keep")
    out = tmp_path / "out"
    run = claim(out, "x", {})
    os.symlink(target, run.path("link"))
    claim(out, "x", {}, overwrite=True)
    assert not (out / "link").exists() and (target / "f").read_text() == "keep"


def test_a_damaged_manifest_is_one_line(tmp_path):
    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / "datagen.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a list, expected an object"):
        claim(tmp_path, "datagen", {})
    (tmp_path / STATE_DIR / "datagen.json").write_text(json.dumps({"entries": []}))
    with pytest.raises(UserError, match="not a speculators_hf run manifest"):
        claim(tmp_path, "datagen", {})


def test_require_complete(tmp_path):
    with pytest.raises(UserError, match="no finished datagen run"):
        require_complete(tmp_path, "datagen", "--data-path", "run datagen first")
    run = claim(tmp_path, "datagen", {})
    with pytest.raises(UserError, match="did not finish"):
        require_complete(tmp_path, "datagen", "--data-path", "rerun datagen to finish it")
    run.finish()
    assert require_complete(tmp_path, "datagen", "--data-path", "")["status"] == "complete"


def test_readonly_claims_decide_without_writing(tmp_path):
    out = tmp_path / "out"
    run = claim(out, "train", {"a": 1}, readonly=True)
    assert run.state == "fresh" and not out.exists()


def test_file_signature_and_changed_keys(tmp_path):
    f = tmp_path / "chats.jsonl"
    f.write_text("a\n")
    first = file_signature(f)
    f.write_text("a\n")  # rewritten, same content: same signature
    assert file_signature(f) == first
    f.write_text("b\n")
    assert file_signature(f) != first
    assert file_signature("sharegpt") == "sharegpt"
    claim(tmp_path / "d", "datagen", {}).finish()
    assert file_signature(tmp_path / "d")["runs"]["datagen"][1] == "complete"
    assert changed_keys({"a": 1, "b": {"c": 1}}, {"a": 1, "b": {"c": 2}, "d": 0}) == ["b.c", "d"]


def test_paths_named_by_files_stay_inside_their_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shard").write_text("x")
    (tmp_path / "outside").write_text("x")
    os.symlink(tmp_path / "outside", tmp_path / "data" / "link")
    assert resolve_inside(tmp_path / "data", "shard", "index.json") == (tmp_path / "data" / "shard").resolve()
    for bad in ("../outside", str(tmp_path / "outside"), "link"):
        with pytest.raises(UserError, match="outside"):
            resolve_inside(tmp_path / "data", bad, "index.json")


def test_a_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "states.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        require_file(fifo, "--data-path")
