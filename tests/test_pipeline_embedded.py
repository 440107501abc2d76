"""The README's first command: `speculators-hf pipeline` with no arguments (the embedded default), end to end.

In a file of its own: it is the longest test (~4-6 minutes on two cores), and a test file runs in one pytest worker.
"""

import json
import os

import pytest

from speculators_hf.pipeline import main


@pytest.mark.vllm
@pytest.mark.slow
def test_embedded_default_pipeline_learns(tmp_path, monkeypatch, capsys):
    """`speculators-hf pipeline` with no arguments (the README's first command): tau clearly above 1 in both engines,
    and the speculative output equals the verifier's greedy output; the small serving grid (K 1-3, T 0/1, batch 1/4)
    with its recommendation and plots travels with the exported draft."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    draft = tmp_path / "runs" / "tiny-default" / "draft"
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
    assert (
        card["recommendation"]["num_speculative_tokens"] in (1, 2, 3) and "Recommended num_speculative_tokens" in out
    )
    assert all((draft / file).is_file() for file in card["plots"].values())
    print(f"eval grid wall time {grid['wall_seconds']} s, engines {grid['engine_seconds']}")
    assert "tau" in out.lower() and os.path.isdir(tmp_path / "runs" / "tiny-default" / "checkpoints")
