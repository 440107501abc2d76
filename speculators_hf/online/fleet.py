"""The hidden-states servers of one online training run: started beside the trainer, stopped after it.

`serve_for_training` starts `serve-hidden-states` servers for a datagen folder (on the GPUs given, else several on
CPU), waits until they answer and yields their URLs with the environment the trainer must run in (the other GPUs, or
its share of the CPU cores); the servers stop whatever happens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..utils import UserError, get_logger
from ..validation import read_json
from .server import HiddenStatesServer, ServeArguments, free_port

logger = get_logger(__name__)


def split_gpus(gpus: str, tensor_parallel_size: int) -> tuple[list[dict[str, str]], dict[str, str]]:
    """`--online-gpus '0,1'`: one server environment per `tensor_parallel_size` GPUs, and the trainer's (the rest)."""
    chosen = [g.strip() for g in gpus.split(",") if g.strip()]
    tp = tensor_parallel_size
    if not chosen or len(chosen) % tp:
        raise UserError(f"--online-gpus {gpus}: give a multiple of --tensor-parallel-size {tp} GPUs.")
    servers = [{"CUDA_VISIBLE_DEVICES": ",".join(chosen[i : i + tp])} for i in range(0, len(chosen), tp)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    pool = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    rest = [g for g in pool if g not in chosen]
    if not rest:
        raise UserError(f"--online-gpus {gpus} leaves no GPU for training (visible: {pool}).")
    return servers, {"CUDA_VISIBLE_DEVICES": ",".join(rest)}


@contextmanager
def serve_for_training(
    verifier: str,
    data_dir: Path,
    log_dir: Path,
    max_model_len: int,
    tensor_parallel_size: int = 1,
    gpus: str | None = None,
    servers: int = 1,
    trust_remote_code: bool = False,
) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Start the servers, wait until they answer, yield `(urls, environment for the trainer)`, stop them."""
    config = read_json(data_dir / "data_config.json", fix="rerun datagen")
    groups: list[dict[str, str]] = [{} for _ in range(servers)]
    trainer_env: dict[str, str] = {}
    if gpus:
        groups, trainer_env = split_gpus(gpus, tensor_parallel_size)
    elif not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # Servers and trainer share the CPU cores: vLLM's worker keeps its cores busy, and a trainer whose threads
        # land on them waits at every parallel op (measured on 2 cores: 488 s -> 48 s for the embedded training).
        trainer_env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (len(groups) + 1)))}
    started = []
    try:
        for k, env in enumerate(groups):
            serve = ServeArguments(
                target_model_path=verifier,
                layer_ids=config["layer_ids"],  # exactly what datagen recorded
                tensor_parallel_size=tensor_parallel_size,
                port=free_port(),
                max_model_len=max_model_len,
                dtype=config["model"]["hidden_states_dtype"],
                trust_remote_code=trust_remote_code,
            )
            log = log_dir / f"hidden-states-server-{k}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            started.append(HiddenStatesServer(serve).start(log, env))
        for server in started:
            server.wait_ready()
        logger.warning("[train] %d hidden-states server(s) ready: %s", len(started), [s.url for s in started])
        yield [s.url for s in started], trainer_env
    finally:
        for server in started:
            server.stop()
