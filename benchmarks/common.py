"""Shared pieces of the benchmarks: shapes, synthetic verifiers, data in both layouts, subprocess runners, tables.

Every comparison runs both trainers as fresh subprocesses, back to back, on the same data and shapes:

* ours with this repository's interpreter (`.venv`), through `benchmarks/_ours_runner.py`;
* vllm-project/speculators 0.9.0 with its own interpreter (`--baseline-python` or `$SPECULATORS_PYTHON`; by default
  `benchmarks/.venv-speculators`, created on first use by `ensure_baseline`), through `benchmarks/_spec_runner.py`,
  which calls its `speculators train` entry point.

Both runners write a JSON result with per-step end timestamps, tokens per step and peak memory, measured the same way.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_WORK_DIR = BENCH_DIR / ".work"  # data, checkpoints, logs and result JSON (git-ignored)
DEFAULT_BASELINE_PY = os.environ.get("SPECULATORS_PYTHON")  # None: benchmarks/.venv-speculators (ensure_baseline)
BASELINE_VENV = BENCH_DIR / ".venv-speculators"  # git-ignored
# The baseline and what its install needs on a CPU machine: torch pinned first (an unpinned one pulls a CUDA build),
# and the torchvision/torchaudio it drags in removed (they break `from transformers import LlamaConfig` on CPU torch).
BASELINE_PACKAGES = ("torch==2.13.0", "speculators==0.9.0")
BASELINE_REMOVE = ("torchvision", "torchaudio")

# Draft/verifier shapes. "tiny" is the tiny verifier kit's shape (speculators_hf.tiny_kit.TINY_LLAMA).
SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=4,
        vocab_size=2048,
        draft_vocab_size=1024,
        aux_layer_ids=[1, 2, 3],
    ),
    # A mid-size CPU shape: big enough that matmuls, not Python overhead, dominate a step.
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=8,
        vocab_size=16384,
        draft_vocab_size=8192,
        aux_layer_ids=[2, 4, 5],
    ),
    # A large draft vocabulary on CPU (issue 16): the draft head and the KL dominate the step.
    "vocab32k": dict(
        hidden_size=256,
        intermediate_size=768,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=8,
        vocab_size=64000,
        draft_vocab_size=32000,
        aux_layer_ids=[2, 4, 5],
    ),
    # Llama-3.1-8B draft shapes (issue 6).
    "llama8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=32,
        vocab_size=128256,
        draft_vocab_size=32000,
        aux_layer_ids=[2, 16, 29],
    ),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ machine facts


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        return "n/a"


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_ours": torch.__version__,
        "device": device,
    }
    try:
        import transformers

        info["transformers_ours"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# Dense bf16 peak TFLOP/s by GPU name (datasheet, SXM parts), for model FLOPs utilisation.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def peak_tflops(gpu_name: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu_name and k in gpu_name), None)


def train_flops_per_token(shape: dict, sample_len: int, ttt_steps: int, train_lm_head: bool = False) -> float:
    """Model FLOPs of one training token: the draft's useful work, the convention behind MFU.

    Per TTT step: layer 0's q/k/v (2H wide) and o projections, the MLP, the lm_head over the draft vocabulary, and
    attention over the keys the mask allows (in-document causal step-0 keys, about (L + 1) / 2 for samples of L
    tokens, plus one key per later step), each x3 for forward + backward (x2 for a frozen lm_head: no weight
    gradient). Once per token: fc over the 3 aux states (x3) and the frozen verifier head for targets (x1).
    """
    H, V = shape["hidden_size"], shape["draft_vocab_size"]
    hd = shape.get("head_dim") or H // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    projections = 2 * (2 * H * q + 2 * 2 * H * kv + q * H)
    mlp = 3 * 2 * H * shape["intermediate_size"]
    lm_head = 2 * H * V
    total = 0.0
    for k in range(ttt_steps):
        attention = 2 * 2 * q * ((sample_len + 1) / 2 + k)  # QK^T and AV over the allowed keys
        total += 3 * (projections + mlp + attention) + (3 if train_lm_head else 2) * lm_head
    aux = len(shape["aux_layer_ids"]) * H  # target hidden size = H for these shapes
    return total + 3 * 2 * aux * H + 2 * H * V


@functools.cache
def ensure_baseline(baseline_python: str | None = None) -> str:
    """The baseline's interpreter: the one given (`--baseline-python`, `$SPECULATORS_PYTHON`), else
    `benchmarks/.venv-speculators/bin/python`, installed there on first use (a few minutes, package registry only)."""
    if baseline_python:
        return baseline_python
    python = BASELINE_VENV / "bin" / "python"
    stamp = BASELINE_VENV / (".installed-" + "-".join(BASELINE_PACKAGES))
    if python.exists() and stamp.exists():
        return str(python)
    log(f"installing the baseline ({', '.join(BASELINE_PACKAGES)}) into {BASELINE_VENV} (first use: a few minutes)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BASELINE_VENV)], check=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", BASELINE_PACKAGES[0]], check=True)
    subprocess.run([*pip, "install", *BASELINE_PACKAGES], check=True)
    subprocess.run([*pip, "uninstall", "-y", *BASELINE_REMOVE], check=False, capture_output=True)
    stamp.touch()
    return str(python)


def baseline_versions(baseline_python: str | None) -> dict:
    baseline_python = ensure_baseline(baseline_python)
    code = (
        "import json, importlib.metadata as m\n"
        "print(json.dumps({p: m.version(p) for p in ('speculators', 'torch', 'transformers', 'datasets')}))"
    )
    out = subprocess.run([baseline_python, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(
            f"The baseline interpreter {baseline_python} cannot import speculators:\n{out.stderr[-2000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- synthetic verifier


def make_synthetic_verifier(path: Path, shape: dict, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A verifier folder with a full Llama config but only the tensors a draft reads (embed, final norm, lm_head).

    Both trainers read only these three tensors from the verifier, so a full checkpoint is not needed.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=shape["vocab_size"] - 1,
        pad_token_id=None,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    V, H = shape["vocab_size"], shape["hidden_size"]
    tensors = {
        "model.embed_tokens.weight": (torch.randn(V, H, generator=gen) * 0.02).to(dtype),
        "lm_head.weight": (torch.randn(V, H, generator=gen) * H**-0.5).to(dtype),
        "model.norm.weight": torch.ones(H, dtype=dtype),
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in tensors}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


# ------------------------------------------------------------------------------------- data in our layout


def write_our_shards(data_dir: Path, samples: list[dict], samples_per_shard: int = 16) -> Path:
    """Write `samples` (`input_ids [T]`, `loss_mask [T]`, `hidden_states [T, 4, H]`) in our shard layout."""
    from speculators_hf.formats.shards import shard_name, write_index, write_shard

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, len(samples), samples_per_shard)):
        chunk = samples[start : start + samples_per_shard]
        ids = list(range(start, start + len(chunk)))
        shards.append(write_shard(data_dir / shard_name(k), chunk, ids))
    write_index(data_dir, {"format": "speculators_hf.shards", "version": 1, "shards": shards})
    return data_dir


def token_freq_and_vocab(data_dir: Path, samples: list[dict], vocab_size: int, draft_vocab_size: int) -> dict:
    """`token_freq.pt` (loss-masked counts) and `d2t.npy`/`t2d.npy` in `data_dir`; returns their paths."""
    from speculators_hf.vocab import build_vocab_mapping

    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in samples:
        ids = s["input_ids"][s["loss_mask"].bool()]
        counts += torch.bincount(ids, minlength=vocab_size)
    freq = {int(i): int(counts[i]) for i in torch.nonzero(counts).flatten()}
    torch.save(freq, data_dir / "token_freq.pt")
    d2t, t2d = build_vocab_mapping(freq, draft_vocab_size, vocab_size)
    np.save(data_dir / "d2t.npy", d2t)
    np.save(data_dir / "t2d.npy", t2d)
    return {"d2t": str(data_dir / "d2t.npy"), "t2d": str(data_dir / "t2d.npy")}


def synthetic_samples(
    n: int, seq_len: int, shape: dict, dtype: torch.dtype, seed: int = 0, unique: int | None = None
) -> list[dict]:
    """`n` random samples of `seq_len` tokens (loss mask all 1); only `unique` distinct hidden-state tensors."""
    gen = torch.Generator().manual_seed(seed)
    H, L = shape["hidden_size"], len(shape["aux_layer_ids"]) + 1
    unique = min(n, unique or n)
    states = [torch.randn(seq_len, L, H, generator=gen).to(dtype) for _ in range(unique)]
    out = []
    for i in range(n):
        out.append(
            {
                "input_ids": torch.randint(0, shape["vocab_size"], (seq_len,), generator=gen),
                "loss_mask": torch.ones(seq_len, dtype=torch.long),
                "hidden_states": states[i % unique],
            }
        )
    return out


def convert_to_speculators(our_dir: Path, spec_dir: Path, baseline_python: str | None, extra_rows: int = 1) -> dict:
    """Write the speculators 0.9.0 offline layout of our shards (run with its own interpreter; verified there)."""
    cmd = [ensure_baseline(baseline_python), str(BENCH_DIR / "_to_speculators.py"), str(our_dir), str(spec_dir)]
    cmd.append(str(extra_rows))
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"conversion to the speculators layout failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- runners


def run_json(cmd: list[str], result_path: Path, log_path: Path, env: dict | None = None, timeout: float | None = None):
    """Run a runner subprocess, tee its output to `log_path`, and return its JSON result (or an error dict)."""
    full_env = {**os.environ, **(env or {})}
    # On a shared 2-core CPU one intra-op thread per trainer is faster and steadier than two (measured); override
    # with BENCH_THREADS. GPU runs use torch's default.
    if full_env.get("BENCH_DEVICE") == "cpu":
        full_env.setdefault("BENCH_THREADS", "1")
        full_env.setdefault("OMP_NUM_THREADS", full_env["BENCH_THREADS"])
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("HF_DATASETS_OFFLINE", "1")
    full_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    full_env.setdefault("WANDB_MODE", "disabled")
    t0 = time.time()
    with open(log_path, "w") as logf:
        try:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=full_env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - t0
    if rc == 0 and Path(result_path).exists():
        result = json.loads(Path(result_path).read_text())
        result["process_wall_s"] = wall
        return result
    tail = Path(log_path).read_text()[-3000:]
    return {"error": f"exit {rc}", "log": str(log_path), "log_tail": tail, "process_wall_s": wall}


def steady_stats(result: dict, warmup: int) -> dict:
    """Steady-state step statistics from a runner result (steps after `warmup` are measured)."""
    if "error" in result:
        return {"error": result["error"]}
    ends = result["step_end_s"]
    tokens = result["tokens_per_step"]
    if len(ends) < warmup + 2:
        return {"error": f"only {len(ends)} steps recorded (warm-up {warmup})"}
    # Step i's time is from the end of step i-1 to the end of step i (fetch + forward + backward + optimizer).
    times = np.diff(np.asarray(ends))[warmup:]  # steps warmup+1 .. n-1
    if result.get("profiled_last_step"):
        times = times[:-1]  # the last step ran under the memory profiler (LastStepAllocations)
    toks = np.asarray(tokens[warmup + 1 : warmup + 1 + len(times)], dtype=np.float64)
    return {
        "steps": int(len(times)),
        "median_step_ms": float(np.median(times) * 1000),
        "mean_step_ms": float(np.mean(times) * 1000),
        # On a shared machine the fastest step is the least disturbed by other load: report it beside the median.
        "min_step_ms": float(np.min(times) * 1000),
        "tokens_per_step": float(np.mean(toks)),
        "tokens_per_s": float(toks.sum() / times.sum()),
        "peak_mem_mib": result.get("peak_mem_mib"),
        "peak_mem_kind": result.get("peak_mem_kind"),
        "step_alloc_peak_mib": result.get("step_alloc_peak_mib"),
    }


def ratio(a, b) -> float | None:
    try:
        return float(a) / float(b) if a is not None and b else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def fmt(x, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:,.{nd}f}"
    return str(x)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    log(f"results written to {path}")


def our_python() -> str:
    return sys.executable


# ------------------------------------------------------------------------------------- one comparison (a pair)


def baseline_argv(
    *,
    verifier: Path,
    spec_data: Path,
    out_dir: Path,
    shape: dict,
    total_seq_len: int,
    ttt_steps: int,
    max_steps: int,
    lr: float,
    warmup_steps: int,
    train_data_ratio: float,
    device: str,
    attn: str = "sdpa",
    loss_impl: str = "eager",
    num_workers: int = 0,
    seed: int = 0,
) -> list[str]:
    """`speculators train` flags giving the same draft and objective as ours (see README: what is aligned)."""
    vd = shape["draft_vocab_size"]
    argv = [
        "--speculator-type", "eagle3",
        "--verifier-name-or-path", str(verifier),
        "--data-path", str(spec_data),
        "--save-path", str(out_dir / "spec_ckpt"),
        "--log-dir", str(out_dir / "spec_logs"),
        "--target-layer-ids", *map(str, shape["aux_layer_ids"]),
        "--draft-vocab-size", str(vd),
        "--d2t-path", str(spec_data / f"d2t-{vd}.npy"),
        "--t2d-path", str(spec_data / f"t2d-{vd}.npy"),
        "--mask-token-id", "0",
        "--num-layers", "1",
        # our draft's defaults: no Eagle-3.1 norms, residual = hidden_norm(h), full attention in the draft layer
        "--no-norm-before-fc", "--no-norm-output", "--norm-before-residual", "--full-attention-indices", "0",
        "--draft-attn-impl", attn,
        "--loss-implementation", loss_impl,
        "--hidden-states-dtype", "bfloat16" if device.startswith("cuda") else "float32",
        "--total-seq-len", str(total_seq_len),
        "--ttt-steps", str(ttt_steps),
        "--ttt-step-loss-decay", "1.0",
        "--optimizer", "adamw", "--lr", str(lr), "--weight-decay", "0.01",
        "--scheduler-type", "linear", "--scheduler-warmup-steps", str(warmup_steps),
        "--epochs", "100000", "--max-steps", str(max_steps),
        "--train-data-ratio", repr(train_data_ratio),
        "--on-missing", "raise",
        "--num-workers", str(num_workers),
        "--log-freq", "1000000000",  # its step profiler synchronizes at every phase when a step is logged
        "--no-resume-from-checkpoint",
        "--seed", str(seed),
    ]  # fmt: skip
    if num_workers > 0:
        argv += ["--prefetch-factor", "4"]
    return argv


def ours_config(
    *,
    verifier: Path,
    our_data: Path,
    out_dir: Path,
    shape: dict,
    total_seq_len: int,
    ttt_steps: int,
    max_steps: int,
    lr: float,
    warmup_steps: int,
    device: str,
    train_lm_head: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    loss_mask_alignment: str | None = None,
) -> dict:
    training_args = {
        "output_dir": str(out_dir / "ours_ckpt"),
        "max_steps": max_steps,
        "learning_rate": lr,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
        "warmup_steps": warmup_steps,
        "total_seq_len": total_seq_len,
        "ttt_steps": ttt_steps,
        "ttt_step_loss_decay": 1.0,
        "eval_split": 0.0,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 10**9,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": num_workers,
        "seed": seed,
        "no_resume_from_checkpoint": True,
        "log_dir": str(out_dir / "ours_logs"),
        "use_cpu": device == "cpu",
    }
    if loss_mask_alignment:
        training_args["loss_mask_alignment"] = loss_mask_alignment
    return {
        "model_args": {
            "verifier_name_or_path": str(verifier),
            "data_path": str(our_data),
            "d2t_path": str(our_data / "d2t.npy"),
            "t2d_path": str(our_data / "t2d.npy"),
            "aux_layer_ids": list(shape["aux_layer_ids"]),
            "num_layers": 1,
            "norm_before_fc": False,
            "norm_output": False,
            "train_lm_head": train_lm_head,
        },
        "training_args": training_args,
        "device": device,
    }


def run_baseline(
    argv: list[str],
    out_dir: Path,
    tag: str,
    device: str,
    max_steps: int,
    baseline_python: str | None,
    save_final: Path | None = None,
    timeout: float | None = None,
    env: dict | None = None,
) -> dict:
    cfg = {
        "argv": argv,
        "device": device,
        "max_steps": max_steps,
        "result": str(out_dir / f"{tag}.json"),
        "save_final": str(save_final) if save_final else None,
    }
    cfg_path = out_dir / f"{tag}.cfg.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    Path(cfg["result"]).unlink(missing_ok=True)
    log(f"baseline run {tag} ...")
    env = {"BENCH_DEVICE": device, **(env or {})}
    res = run_json(
        [ensure_baseline(baseline_python), str(BENCH_DIR / "_spec_runner.py"), str(cfg_path)],
        Path(cfg["result"]),
        out_dir / f"{tag}.log",
        env=env,
        timeout=timeout,
    )
    log(f"baseline run {tag}: {'ERROR ' + res['error'] if 'error' in res else 'done'} ({res['process_wall_s']:.0f} s)")
    return res


def run_ours(
    cfg: dict,
    out_dir: Path,
    tag: str,
    save_final: Path | None = None,
    timeout: float | None = None,
    env: dict | None = None,
) -> dict:
    cfg = {**cfg, "result": str(out_dir / f"{tag}.json"), "save_final": str(save_final) if save_final else None}
    cfg_path = out_dir / f"{tag}.cfg.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    Path(cfg["result"]).unlink(missing_ok=True)
    log(f"our run {tag} ...")
    env = {"BENCH_DEVICE": cfg["device"], **(env or {})}
    res = run_json(
        [our_python(), str(BENCH_DIR / "_ours_runner.py"), str(cfg_path)],
        Path(cfg["result"]),
        out_dir / f"{tag}.log",
        env=env,
        timeout=timeout,
    )
    log(f"our run {tag}: {'ERROR ' + res['error'] if 'error' in res else 'done'} ({res['process_wall_s']:.0f} s)")
    return res


def prepare_synthetic(
    work: Path,
    shape_name: str,
    *,
    n_samples: int,
    sample_len: int,
    device: str,
    baseline_python: str | None,
    unique: int | None = None,
) -> dict:
    """Synthetic verifier + the same synthetic hidden states in both layouts (cached in `work`)."""
    shape = SHAPES[shape_name]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    verifier = make_synthetic_verifier(work / f"verifier-{shape_name}", shape, dtype=dtype)
    tag = f"{shape_name}-n{n_samples}-L{sample_len}-{str(dtype).split('.')[-1]}"
    our_dir, spec_dir = work / f"data-ours-{tag}", work / f"data-spec-{tag}"
    if not (spec_dir / "dataset_info.json").exists():
        log(f"writing synthetic data {tag} in both layouts ...")
        samples = synthetic_samples(n_samples, sample_len, shape, dtype, unique=unique)
        write_our_shards(our_dir, samples)
        token_freq_and_vocab(our_dir, samples, shape["vocab_size"], shape["draft_vocab_size"])
        del samples
        info = convert_to_speculators(our_dir, spec_dir, baseline_python, extra_rows=1)
        log(f"speculators layout verified: {info}")
    return {
        "shape": shape,
        "verifier": verifier,
        "our_data": our_dir,
        "spec_data": spec_dir,
        "train_data_ratio": (n_samples + 0.5) / (n_samples + 1),
    }
