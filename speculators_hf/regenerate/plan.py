"""`prepare(args)`: everything a regenerate run knows before an engine starts (the verifier's config and tokenizer,
sampling, the source) and the inputs its run state is fingerprinted on. Reads only; writes nothing."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from ..datagen.metadata import resolve_dtype
from ..datagen.sources import load_source
from ..datagen.tokenize import tokenizer_fingerprint
from ..formats.chat_template import read_chat_template
from ..formats.provenance import CONFIG_VERSION
from ..modeling.verifier_weights import check_verifier_weights
from ..runstate import file_signature, fingerprint
from ..utils import UserError
from ..validation import pretrained_config, pretrained_tokenizer
from .arguments import RegenerateArguments
from .rollout import Conversation, RolloutConfig
from .sampling import Sampling, resolve_sampling
from .sources import conversation_ids, source_conversation
from .writer import OutputLayout

# Flags that do not change what is generated, so a run may resume with other values.
NOT_FINGERPRINTED = (
    "output_path",
    "backend",
    "server_url",
    "server_api_key",  # a secret: never recorded
    "concurrency",
    "request_timeout",
    "max_retries",
    "retry_backoff",
    "tensor_parallel_size",
    "data_parallel_size",
    "gpu_memory_utilization",
    "batch_size",
    "chunk_size",
    "cache_dir",
    "trust_remote_code",
    "overwrite",
    "rank",
    "world_size",
)


@dataclass
class Plan:
    args: RegenerateArguments
    layout: OutputLayout
    tokenizer: object
    model_config: object  # the verifier's text config
    verifier: dict
    dtype: str
    chat_template: str | None
    sampling: Sampling
    dataset: object  # datasets.Dataset: the source rows, shuffled and limited
    ids: list[str]
    source: dict
    inputs: dict  # what the run state fingerprints: everything that changes the output

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)

    def conversation(self, index: int, config: RolloutConfig) -> Conversation:
        with config.lock:
            messages, tools = source_conversation(self.dataset[index])
        if messages is None:
            conv = Conversation(self.ids[index], index, [], config)
            conv.reason, conv.status = "unknown roles or empty conversation", "skipped"
            return conv
        return Conversation(self.ids[index], index, messages, config, tools=tools)


def prepare(args: RegenerateArguments) -> Plan:
    """The verifier's config and tokenizer (its code runs only with `--trust-remote-code`), sampling, the source."""
    path, label, trust = args.target_model_path, "--target-model-path", args.trust_remote_code
    config = pretrained_config(path, label, trust_remote_code=trust, revision=args.revision)
    tokenizer = pretrained_tokenizer(path, label, trust_remote_code=trust, revision=args.revision)
    check_verifier_weights(path, label)
    text_config = config.get_text_config()
    chat_template = read_chat_template(args.chat_template)
    if chat_template is None and not tokenizer.chat_template:
        raise UserError(f"The tokenizer of {path} has no chat template: pass --chat-template.")
    config_dtype = getattr(text_config, "dtype", None) or getattr(config, "dtype", None)
    verifier = {
        "name_or_path": path,
        "revision": args.revision,
        "commit_hash": getattr(config, "_commit_hash", None),
        "architectures": list(getattr(config, "architectures", None) or []),
        "config_sha256": hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16],
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer, chat_template),
        "dtype": str(config_dtype).replace("torch.", "") if config_dtype is not None else None,
    }
    dtype = resolve_dtype(args.dtype, verifier)

    dataset = load_source(args.train_data_path, split=args.split, cache_dir=args.cache_dir)
    num_rows = len(dataset)
    if args.shuffle:
        dataset = dataset.shuffle(seed=args.seed)
    if args.max_samples is not None and args.max_samples < len(dataset):
        dataset = dataset.select(range(args.max_samples))
    source = {
        "train_data_path": args.train_data_path,
        "split": args.split,
        "num_rows": num_rows,
        "used_rows": len(dataset),
        "fingerprint": dataset._fingerprint,
    }
    if Path(args.train_data_path).is_file():
        source["sha256"] = file_signature(args.train_data_path)["sha256"]
    sampling = resolve_sampling(args, tokenizer, text_config)
    inputs = {
        "version": CONFIG_VERSION,
        "arguments": {k: v for k, v in asdict(args).items() if k not in NOT_FINGERPRINTED},
        "verifier": verifier,
        "dtype": dtype,
        "sampling": sampling.record(),
        "source": {"fingerprint": source["fingerprint"], "sha256": source.get("sha256")},
    }
    return Plan(
        args,
        OutputLayout(Path(args.output_path)),
        tokenizer,
        text_config,
        verifier,
        dtype,
        chat_template,
        sampling,
        dataset,
        conversation_ids(dataset),
        source,
        inputs,
    )
