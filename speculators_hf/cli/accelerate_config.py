"""`speculators-hf accelerate-config`: the accelerate configs that ship with the package, by name.

    speculators-hf accelerate-config                  # lists them: name and path
    accelerate launch --config_file "$(speculators-hf accelerate-config --name ddp)" -m speculators_hf.training ...

In a clone they are the top-level `accelerate_configs/*.yaml`; an installed wheel carries the same files in
`speculators_hf/accelerate_configs/`. `speculators-hf pipeline --accelerate-config ddp` takes a name too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..commandline import run_command
from ..utils import UserError
from ..validation import read_yaml

_PACKAGE = Path(__file__).resolve().parent.parent


def accelerate_config_dir() -> Path:
    """The folder of the shipped configs: inside the installed package, else the clone's top-level folder."""
    installed = _PACKAGE / "accelerate_configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "accelerate_configs"


def accelerate_config_names() -> list[str]:
    return sorted(p.stem for p in accelerate_config_dir().glob("*.yaml"))


def resolve_accelerate_config(name_or_path: str) -> Path:
    """An existing file as given, else a shipped config by name (`ddp`, `ddp.yaml`, `accelerate_configs/ddp.yaml`)."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        read_yaml(
            given, f"accelerate config {given}", "give an accelerate config file (`accelerate config` writes one)"
        )
        return given.resolve()
    shipped = accelerate_config_dir() / f"{Path(name_or_path).stem}.yaml"
    if given.suffix in ("", ".yaml") and shipped.is_file():
        return shipped
    raise UserError(
        f"accelerate config {name_or_path!r} is neither a file nor a shipped config name; "
        f"choose from {', '.join(accelerate_config_names())} or give a YAML file."
    )


@dataclass
class AccelerateConfigArguments:
    """Print the path of a shipped accelerate config (with no --name: list them all)."""

    name: str | None = field(
        default=None, metadata={"help": "Config name, e.g. ddp, fsdp2, single_gpu, cpu_ddp (default: list them)."}
    )


def run(args: AccelerateConfigArguments) -> None:
    if args.name is not None:
        print(resolve_accelerate_config(args.name))
        return
    for name in accelerate_config_names():
        print(f"{name:<12} {accelerate_config_dir() / f'{name}.yaml'}")


def main(argv: list[str] | None = None) -> int:
    return run_command(AccelerateConfigArguments, run, argv, prog="speculators-hf accelerate-config")


if __name__ == "__main__":
    raise SystemExit(main())
