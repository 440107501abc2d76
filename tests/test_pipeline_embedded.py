"""The README's first command: `speculators-hf pipeline` with no arguments (the embedded default), end to end.

In a file of its own: it is the longest test (~4-6 minutes on two cores), and a test file runs in one pytest worker.
It is also the suite's one real vLLM serving grid (`evaluate --grid`: one engine per K, reused on a rerun), so the
grid's end-to-end checks live here rather than in a second test that would start engines of its own.
"""

import json
import os

import pytest

from speculators_hf import export
from speculators_hf.evaluation.card import PLOT_FILES
from speculators_hf.formats.checkpoint import speculative_config
from speculators_hf.hub.cli import main as push_main
from speculators_hf.pipeline import main
from tests.test_eval_grid import decode_png


@pytest.mark.vllm
@pytest.mark.slow
def test_embedded_default_pipeline_learns(tmp_path, monkeypatch, capsys):
    """`speculators-hf pipeline` with no arguments (the README's first command): tau clearly above 1 in both engines,
    and the speculative output equals the verifier's greedy output; the small serving grid (K 1-3, T 0/1, batch 1/4)
    with its recommendation and plots travels with the exported draft: one vLLM engine per K (not one per cell),
    greedy cells identical to the verifier alone, sampled cells marked on CPU; a rerun reuses every engine record
    and keeps the transformers runs; push serves the recommended K and stages the plots."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny-default"
    draft = run / "draft"
    card = json.loads((draft / "eval_card.json").read_text())
    greedy = {r["engine"]: r for r in card["runs"] if r["temperature"] == 0}
    assert set(greedy) == {"transformers", "vllm"}, out
    for engine, result in greedy.items():
        assert result["tau"] > 1.2, (engine, result)
        assert result["output_matches_verifier_greedy"] is True, (engine, result)
    assert card["offline"]["tau_sim"] > 1.2
    grid = card["grid"]
    assert (grid["ks"], grid["temperatures"], grid["batch_sizes"]) == ([1, 2, 3], [0.0, 1.0], [1, 4])
    assert len(grid["cells"]) == 12 and all(c["tau"] >= 1.0 for c in grid["cells"])
    assert all(c["output_matches_verifier_greedy"] for c in grid["cells"] if c["temperature"] == 0)
    assert grid["dataset"]["path"] == str(run / "eval_chats.jsonl")  # the pipeline's held-out chats
    for c in grid["cells"]:
        assert c["num_requests"] == max(grid["dataset"]["num_prompts"], c["batch_size"]), c
        assert c["speedup"] > 0 and c["tpot_ms"] > 0, c
        pos = c["acceptance_per_position"]
        assert len(pos) == c["k"] and all(a >= b for a, b in zip(pos, pos[1:])), c
        assert ("caveat" in c) == (grid["device"] == "cpu" and c["temperature"] > 0), c
        if c["temperature"] == 0:
            assert c["tau"] > 1.2, c  # the trained draft is accepted at every K
        else:
            assert c["output_matches_verifier_greedy"] is None, c
    rec = card["recommendation"]
    assert rec["num_speculative_tokens"] in (1, 2, 3) and "Recommended num_speculative_tokens" in out
    assert len(rec["per_load"]) == 4  # one row per (temperature, batch size)
    for file in card["plots"].values():
        assert decode_png((draft / file).read_bytes()).shape[2] == 3, file
    records = run / "checkpoints" / max((p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()), key=int)
    for k in (0, 1, 2, 3):  # one engine for the verifier alone, one per K: not one per cell
        log = (records / "eval_grid" / f"vllm_k{k}.log").read_text()
        assert log.count("Initializing a V1 LLM engine") == 1, k
    print(f"eval grid wall time {grid['wall_seconds']} s, engines {grid['engine_seconds']}")
    assert "tau" in out.lower() and os.path.isdir(run / "checkpoints")
    runs = [(r["engine"], r["num_speculative_tokens"], r["temperature"]) for r in card["runs"]]

    # The same command again: every stage up to date, the grid's card rewritten from its engine records (no engine
    # starts) and the transformers runs of the first evaluation kept beside the grid's vLLM rows.
    assert main([]) == 0
    again_out = capsys.readouterr().out
    assert "Recommended num_speculative_tokens" in again_out
    again = json.loads((records / "eval_card.json").read_text())
    assert again["grid"]["reused_engines"] == [0, 1, 2, 3]
    assert [(r["engine"], r["num_speculative_tokens"], r["temperature"]) for r in again["runs"]] == runs
    assert again["grid"]["cells"] == grid["cells"] and again["dataset"] == card["dataset"]

    # push (staged, nothing uploaded) serves the recommended K, with its schedule when the best K differed across
    # batch sizes and paid, and stages the plots (the embedded draft records the cached verifier's local path: a hub
    # repo needs a hub id, which export sets)
    hub_ready = tmp_path / "hub-ready"
    export.run(export.ExportArguments(checkpoint=str(draft), output_dir=str(hub_ready), verifier_hub_id="org/tiny"))
    assert push_main(["--checkpoint", str(hub_ready), "--repo-id", "org/x", "--local-dir", str(tmp_path / "up")]) == 0
    pushed = capsys.readouterr().out
    schedule = rec["num_speculative_tokens_per_batch_size"] if rec["speculate"] else None
    assert json.dumps(speculative_config({}, "org/x", rec["num_speculative_tokens"], schedule)) in pushed
    assert all((tmp_path / "up" / file).is_file() for file in PLOT_FILES.values())
