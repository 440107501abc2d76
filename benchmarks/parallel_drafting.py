"""Drafting time per step and drafting FLOPs per step: parallel drafting (P-EAGLE, 1 pass over the new rows + K-1
mask slots) vs chained drafting (1 pass over the new rows, then K-1 passes of 1 token), same draft shape.

    .venv/bin/python benchmarks/parallel_drafting.py [--draft-dir RUN/draft] [--k 3] [--new-rows 2] [--repeats 200]

The draft shape is that of `--draft-dir` (an exported draft; default: the embedded default's verifier config with a
1024-token draft vocabulary). One engine step is timed the way our transformers engine drafts (`Eagle3DraftModel.
draft` after a prefill of `--context` rows, the cache cropped back after each step), both modes on the same weights
in one process, alternating, medians over `--repeats`. FLOPs on paper count the matmuls of one step (2 * m * n * k).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from speculators_hf.modeling import Eagle3Config, Eagle3DraftModel
from speculators_hf.tiny_kit import tiny_llama_config


def step_flops(config: Eagle3Config, rows: int, k: int, context: int, parallel: bool) -> int:
    """Matmul FLOPs of one drafting step: `rows` new rows fed verifier states, then K tokens drafted."""
    H, Vd, inter = config.hidden_size, config.draft_vocab_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or H // heads
    fused = config.num_aux_layers * (config.target_hidden_size or H)

    def forward(tokens: int, keys: int, fuse_tokens: int, head_tokens: int) -> int:
        flops = 2 * fuse_tokens * fused * H  # fc
        for i in range(config.num_hidden_layers):
            width = 2 * H if i == 0 else H
            flops += 2 * tokens * width * (heads + 2 * kv) * hd + 2 * tokens * heads * hd * H  # q/k/v, o
            flops += 2 * 2 * tokens * keys * heads * hd  # scores, values
            flops += 2 * 3 * tokens * H * inter  # gate, up, down
        return flops + 2 * head_tokens * H * Vd  # lm_head

    if parallel:  # mask_hidden's fc is one row (a constant at serve time; vLLM computes it once)
        tokens = rows + k - 1
        return forward(tokens, context + tokens, rows, k)
    total = forward(rows, context + rows, rows, 1)
    for i in range(1, k):
        total += forward(1, context + rows + i, 0, 1)
    return total


def time_step(model: Eagle3DraftModel, ids, aux, k: int, rows: int, repeats: int) -> float:
    """Median seconds of one drafting step after a prefill of all but the last `rows` rows."""
    with torch.no_grad():
        pre = model(ids[:, :-rows], aux_hidden_states=aux[:, :-rows], use_cache=True)
        cache, base = pre.past_key_values, ids.shape[1] - rows
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.draft(ids[:, -rows:], aux[:, -rows:], k, cache)
            times.append(time.perf_counter() - start)
            cache.crop(base - cache.get_seq_length())  # drop the step's rows and slots
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft-dir", default=None)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--new-rows", type=int, default=2, help="rows fed verifier states per step (accepted + 1)")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.draft_dir:
        config = Eagle3Config.from_pretrained(args.draft_dir)
    else:
        config = Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=1024)
    chained_config = copy.deepcopy(config)
    chained_config.parallel_drafting, chained_config.mask_token_id = False, None
    parallel_config = copy.deepcopy(config)
    parallel_config.parallel_drafting, parallel_config.mask_token_id = True, config.mask_token_id or 0
    torch.manual_seed(0)
    chained = Eagle3DraftModel(chained_config).eval()
    parallel = Eagle3DraftModel(parallel_config).eval()
    parallel.load_state_dict(chained.state_dict(), strict=False)  # same weights; mask_hidden its own
    T = args.context + args.new_rows
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, T), generator=g)
    aux = torch.randn(1, T, config.num_aux_layers * (config.target_hidden_size or config.hidden_size), generator=g)
    for model in (chained, parallel):  # warm-up
        time_step(model, ids, aux, args.k, args.new_rows, 10)
    runs = {"chained": [], "parallel": []}
    for _ in range(5):  # alternate, so that load changes hit both
        runs["chained"].append(time_step(chained, ids, aux, args.k, args.new_rows, args.repeats // 5))
        runs["parallel"].append(time_step(parallel, ids, aux, args.k, args.new_rows, args.repeats // 5))
    print(
        f"draft H={config.hidden_size} layers={config.num_hidden_layers} Vd={config.draft_vocab_size} "
        f"K={args.k} new rows={args.new_rows} context={args.context} threads={args.threads}"
    )
    print("| drafting | ms per step (median of 5 medians, min-max) | matmul MFLOPs per step | forward passes |")
    print("|---|---|---|---|")
    for name, times in runs.items():
        flops = step_flops(config, args.new_rows, args.k, args.context, name == "parallel")
        passes = 1 if name == "parallel" else args.k
        print(
            f"| {name} | {1e3 * statistics.median(times):.3f} ({1e3 * min(times):.3f}-{1e3 * max(times):.3f}) "
            f"| {flops / 1e6:.2f} | {passes} |"
        )
    ratio = statistics.median(runs["chained"]) / statistics.median(runs["parallel"])
    print(f"chained / parallel time per step: {ratio:.2f}x")
    # On paper, a Llama-3.1-8B-shaped draft (1 layer, Vd 32000) at a 2048-token context
    big = Eagle3Config(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, num_hidden_layers=1, draft_vocab_size=32000, eagle_aux_hidden_state_layer_ids=[2, 16, 29],
    )  # fmt: skip
    for rows in (1, args.k + 1):
        c, p = (step_flops(big, rows, args.k, 2048, par) for par in (False, True))
        print(
            f"Llama-3.1-8B draft shape, K={args.k}, {rows} new rows: chained {c / 1e9:.2f} GFLOPs in {args.k} passes, "
            f"parallel {p / 1e9:.2f} GFLOPs in 1 pass ({p / c:.2f}x the FLOPs, 1/{args.k} of the sequential passes)"
        )


if __name__ == "__main__":
    main()
