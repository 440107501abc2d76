"""Quality at equal budget: our trainer vs `speculators train` (0.9.0) on the same datagen output of the tiny peaked
verifier, same steps and LR schedule; held-out `acc_k`, `cond_acc_k`, `tau_sim` from ONE evaluation function.

    .venv/bin/python benchmarks/quality.py                       # CPU, ~10 min on 2 idle cores
    .venv/bin/python benchmarks/quality.py --steps 60 --train-samples 200   # a quick smoke run

Data: chitchat conversations (offline, from the `chitchat-dataset` wheel) through `python -m speculators_hf.datagen
--backend transformers` on the tiny peaked verifier; the training set and a disjoint held-out set. The training
shards are converted to speculators' layout (`_to_speculators.py`, checked with its own dataset class).

Training (both): 1 draft layer, the same draft vocabulary (`d2t`/`t2d` from the training data), K TTT steps, AdamW
(lr, weight decay 0.01), linear schedule with the same warm-up, the same number of optimizer steps and total sequence
length. The trainers' own choices are kept where they differ (see README): which rows are supervised (ours: the
predicted token is an assistant token; speculators: the input token is), and whether lm_head trains (ours: yes by
default, speculators: frozen) -- `--ours-frozen-lm-head` adds a run of ours with lm_head frozen.

Evaluation (`evaluate_draft`, the same code for every draft): both checkpoints are loaded with
`Eagle3DraftModel.from_pretrained` (which reads speculators' format) and unrolled per held-out sample, K teacher-forced
draft steps with a dense TTT mask. Row t at step k proposes the token at position t+2+k; it counts when that token is
an assistant token; it is correct when the draft's token (mapped to verifier ids) equals the verifier's greedy token
there (argmax over the *full* verifier vocabulary, from its last hidden state). `cond_acc_k` = P(step k correct |
steps < k correct); `tau_sim = 1 + sum_k prod_{i<=k} cond_acc_i`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

# ------------------------------------------------------------------------------------------------- evaluation


def ttt_dense_mask(T: int, step: int) -> torch.Tensor:
    """`[1, 1, T, (step + 1) T]` bool: causal over step-0 keys plus the own position in each later step."""
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    diag = torch.eye(T, dtype=torch.bool)
    return torch.cat([causal] + [diag] * step, dim=-1)[None, None]


@torch.no_grad()
def evaluate_draft(model, samples: list[dict], verifier_norm, verifier_lm_head, ttt_steps: int) -> dict:
    """Held-out `acc_k`, `cond_acc_k`, `tau_sim` of a draft (see the module docstring for the definitions).

    Args:
        model: an `Eagle3DraftModel` (ours, or speculators' checkpoint loaded into ours).
        samples: `{"input_ids" [T], "loss_mask" [T], "hidden_states" [T, L, H]}` (L = aux layers + last).
        verifier_norm, verifier_lm_head: the verifier's final norm and full-vocabulary lm_head.
    """
    from transformers.cache_utils import DynamicCache

    model.eval()
    count = torch.zeros(ttt_steps, dtype=torch.float64)
    correct = torch.zeros(ttt_steps, dtype=torch.float64)
    cond_count = torch.zeros(ttt_steps, dtype=torch.float64)
    cond_correct = torch.zeros(ttt_steps, dtype=torch.float64)
    for s in samples:
        x, lm, hs = s["input_ids"].long(), s["loss_mask"].long(), s["hidden_states"].float()
        T = len(x) - 1  # rows t = 0 .. T-1 read (g_t, x_{t+1})
        if T < 2:
            continue
        greedy = verifier_lm_head(verifier_norm(hs[:, -1])).argmax(-1)  # [T+1]: greedy[p] = verifier's token p+1
        aux = hs[:-1, :-1].reshape(T, -1)[None]  # [1, T, 3H]
        cache = DynamicCache(config=model.config)
        hidden, prev_ok = None, torch.ones(T, dtype=torch.bool)
        for k in range(ttt_steps):
            ids = torch.cat([x[1 + k :], x.new_zeros(k)])[:T][None]  # x_{t+1+k}
            out = model(
                input_ids=ids,
                aux_hidden_states=aux if k == 0 else None,
                hidden_states=hidden,
                position_ids=(torch.arange(T) + k)[None],
                attention_mask=ttt_dense_mask(T, k),
                past_key_values=cache,
                use_cache=True,
            )
            hidden = out.hidden_states
            draft = model.draft_to_target_ids(out.logits[0].argmax(-1))  # [T] verifier ids, for token t+2+k
            n = T - 1 - k  # rows whose predicted position t+2+k <= T exists in the sample
            if n <= 0:
                break
            hit = draft[:n] == greedy[1 + k : 1 + k + n]
            valid = lm[2 + k : 2 + k + n].bool()
            ok_before = prev_ok[:n]
            count[k] += valid.sum()
            correct[k] += (hit & valid).sum()
            cond_count[k] += (valid & ok_before).sum()
            cond_correct[k] += (hit & valid & ok_before).sum()
            prev_ok = torch.cat([ok_before & hit, torch.zeros(T - n, dtype=torch.bool)])
    out, tau, run = {}, 1.0, 1.0
    for k in range(ttt_steps):
        out[f"acc_{k}"] = float(correct[k] / count[k].clamp(min=1))
        out[f"cond_acc_{k}"] = float(cond_correct[k] / cond_count[k].clamp(min=1))
        run *= out[f"cond_acc_{k}"]
        tau += run
    out["tau_sim"] = tau
    out["rows"] = int(count[0])
    return out


def load_verifier_head(verifier: Path):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from speculators_hf.modeling.verifier_weights import load_verifier_tensors

    cfg = AutoConfig.from_pretrained(verifier)
    t = load_verifier_tensors(str(verifier), cfg)
    V, H = t["lm_head"].shape
    norm = LlamaRMSNorm(H, eps=cfg.get_text_config().rms_norm_eps)
    norm.weight.data.copy_(t["norm"])
    head = torch.nn.Linear(H, V, bias=False)
    head.weight.data.copy_(t["lm_head"])
    return norm.eval(), head.eval()


# ---------------------------------------------------------------------------------------------------- data


def datagen(verifier: Path, chats: Path, out_dir: Path, seq_length: int) -> Path:
    """Our datagen (transformers backend) on a local chat file; falls back to the backend API if the CLI fails."""
    if (out_dir / "index.json").exists():
        return out_dir
    cmd = [C.our_python(), "-m", "speculators_hf.datagen", "--target-model-path", str(verifier),
           "--train-data-path", str(chats), "--output-dir", str(out_dir), "--seq-length", str(seq_length),
           "--backend", "transformers", "--batch-size", "8"]  # fmt: skip
    C.log("datagen: " + " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not (out_dir / "index.json").exists():
        raise SystemExit(f"datagen failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return out_dir


def read_all(data_dir: Path) -> list[dict]:
    from speculators_hf.formats.shards import ShardDataset

    ds = ShardDataset(data_dir)
    return [ds[i] for i in range(len(ds))]


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=600, help="training conversations")
    p.add_argument("--eval-samples", type=int, default=150, help="held-out conversations")
    p.add_argument("--seq-length", type=int, default=512, help="datagen truncation")
    p.add_argument("--total-seq-len", type=int, default=1024)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps, both trainers")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ours-frozen-lm-head", action="store_true", help="also run ours with lm_head frozen")
    p.add_argument("--baseline-python", default=C.DEFAULT_BASELINE_PY)
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK_DIR)
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    from speculators_hf.modeling import Eagle3DraftModel
    from speculators_hf.tiny_kit import tiny_verifier, write_chat_jsonl

    work = a.work_dir.resolve() / "quality"
    work.mkdir(parents=True, exist_ok=True)
    info = C.machine_info("cpu")
    info["baseline"] = C.baseline_versions(a.baseline_python)
    info["load_before"] = C.uptime()
    verifier = tiny_verifier("peaked")
    shape = dict(C.SHAPES["tiny"])
    tag = f"n{a.train_samples}-e{a.eval_samples}-s{a.seq_length}"
    train_chats = write_chat_jsonl(work / f"train-{tag}.jsonl", a.train_samples, offset=2500)
    eval_chats = write_chat_jsonl(work / f"eval-{tag}.jsonl", a.eval_samples, offset=6500)
    train_dir = datagen(verifier, train_chats, work / f"data-ours-{tag}", a.seq_length)
    eval_dir = datagen(verifier, eval_chats, work / f"heldout-{tag}", a.seq_length)
    samples = read_all(train_dir)
    C.token_freq_and_vocab(train_dir, samples, shape["vocab_size"], shape["draft_vocab_size"])
    spec_dir = work / f"data-spec-{tag}"
    if not (spec_dir / "dataset_info.json").exists():
        C.log(f"speculators layout: {C.convert_to_speculators(train_dir, spec_dir, a.baseline_python)}")
    n = len(samples)
    train_tokens = sum(len(s["input_ids"]) for s in samples)
    del samples

    run_dir = work / f"runs-{tag}-S{a.total_seq_len}-K{a.ttt_steps}-steps{a.steps}"
    run_dir.mkdir(parents=True, exist_ok=True)
    common = dict(shape=shape, total_seq_len=a.total_seq_len, ttt_steps=a.ttt_steps, max_steps=a.steps, lr=a.lr,
                  warmup_steps=a.warmup_steps, device="cpu")  # fmt: skip
    argv_b = C.baseline_argv(verifier=verifier, spec_data=spec_dir, out_dir=run_dir,
                             train_data_ratio=(n + 0.5) / (n + 1), **common)  # fmt: skip
    runs = {}
    ckpts = {"speculators 0.9.0": run_dir / "final-baseline"}
    runs["speculators 0.9.0"] = C.run_baseline(
        argv_b, run_dir, "quality-baseline", "cpu", a.steps, a.baseline_python, save_final=ckpts["speculators 0.9.0"]
    )
    variants = [("speculators_hf (ours, defaults)", True)]
    if a.ours_frozen_lm_head:
        variants.append(("speculators_hf (ours, lm_head frozen)", False))
    for name, train_head in variants:
        key = "ours" if train_head else "ours-frozen"
        ckpts[name] = run_dir / f"final-{key}"
        cfg = C.ours_config(verifier=verifier, our_data=train_dir, out_dir=run_dir, train_lm_head=train_head, **common)
        runs[name] = C.run_ours(cfg, run_dir, f"quality-{key}", save_final=ckpts[name])

    # One evaluation function for every draft, on the same held-out samples.
    held_out = read_all(eval_dir)
    norm, head = load_verifier_head(verifier)
    torch.manual_seed(0)
    metrics = {}
    for name, path in ckpts.items():
        if "error" in runs[name]:
            metrics[name] = {"error": runs[name]["error"]}
            continue
        model = Eagle3DraftModel.from_pretrained(path).float()
        model.set_attn_implementation("sdpa")
        metrics[name] = evaluate_draft(model, held_out, norm, head, a.ttt_steps)
        metrics[name]["train_wall_s"] = runs[name].get("train_wall_s")
        C.log(f"{name}: {metrics[name]}")
    # and the untrained draft, as a floor
    from speculators_hf.vocab import load_vocab_mapping

    d2t, t2d = load_vocab_mapping(train_dir / "d2t.npy", train_dir / "t2d.npy")
    init = Eagle3DraftModel.from_verifier(str(verifier), d2t, t2d, aux_layer_ids=shape["aux_layer_ids"])
    init.set_attn_implementation("sdpa")
    metrics["untrained draft"] = evaluate_draft(init, held_out, norm, head, a.ttt_steps)

    info["load_after"] = C.uptime()
    result = {
        "benchmark": "quality",
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "data": {"train_samples": n, "train_tokens": train_tokens, "held_out_samples": len(held_out)},
        "metrics": metrics,
    }
    keys = [f"acc_{k}" for k in range(a.ttt_steps)] + [f"cond_acc_{k}" for k in range(a.ttt_steps)] + ["tau_sim"]
    rows = []
    for name, m in metrics.items():
        rows.append([name] + (["error"] * len(keys) if "error" in m else [f"{m[k]:.4f}" for k in keys]))
    base = metrics.get("speculators 0.9.0", {})
    for name, m in metrics.items():
        if name.startswith("speculators_hf") and "error" not in m and "error" not in base:
            rows.append([f"{name} / baseline"] + [f"{C.ratio(m[k], base[k]) or 0:.3f}" for k in keys])
    print()
    print(f"# Held-out quality, tiny peaked verifier, {n} training samples ({train_tokens} tokens), {a.steps} steps, "
          f"total_seq_len {a.total_seq_len}, K={a.ttt_steps}, {len(held_out)} held-out samples")  # fmt: skip
    print(C.markdown_table(["draft"] + keys, rows))
    print(f"load before: {info['load_before']}\nload after:  {info['load_after']}")
    C.save_results(a.output or a.work_dir.resolve() / "quality.json", result)
    return result


if __name__ == "__main__":
    main()
