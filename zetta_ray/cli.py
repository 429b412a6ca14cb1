"""The ``zetta-ray`` command.

    zetta-ray train [--config FILE.toml] [--steps N] [--seed S] [--address ADDR] [--metrics-json PATH]

``train`` runs ``zetta_ray.trainer.train``: an MoE transformer on the byte-level standard-library corpus,
with a progress bar on stderr and a one-line summary on stdout. Settings come from the dataclass
defaults, then the TOML file (tables ``[model]``, ``[train]``, ``[runtime]`` map onto ``zr.MoEConfig``,
``zr.TrainConfig`` and ``zr.RuntimeConfig``), then the command-line flags. Each subcommand is a
``_cmd_<name>`` function registered in ``build_parser``.

Errors that zetta_ray raises on purpose (``ZettaError``, including ``ConfigError``) end the command with a
one-line message and exit status 2 (configuration) or 1 (anything else), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zetta_ray.config import MoEConfig, RuntimeConfig, TrainConfig, from_mapping
from zetta_ray.errors import ConfigError, ZettaError
from zetta_ray.trainer import StepMetrics, train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["RunConfig", "build_parser", "load_config", "main"]

_TABLES: dict[str, type] = {"model": MoEConfig, "train": TrainConfig, "runtime": RuntimeConfig}


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """The three configs of one ``zetta-ray train`` run."""

    model: MoEConfig
    train: TrainConfig
    runtime: RuntimeConfig


def _check_types(cls: type, table: str, values: dict[str, Any]) -> None:
    """Reject TOML values of the wrong type, naming the key, the value and the type it must have."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        want = hints.get(key)
        if want is None:
            continue  # an unknown key: from_mapping names it
        allowed = typing.get_args(want) if isinstance(want, types.UnionType) else (want,)
        if float in allowed:
            allowed = (*allowed, int)  # TOML writes 1 for 1.0
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join(t.__name__ for t in allowed if t is not type(None))
            raise ConfigError(
                f"[{table}] {key} = {value!r} is a {type(value).__name__}; {cls.__name__}.{key} takes {names}"
            )


def load_config(path: str | Path | None = None, **train_overrides: Any) -> RunConfig:
    """Defaults, then the TOML file at ``path``, then ``train_overrides`` (``None`` values ignored).

    Unknown tables and unknown keys are errors that name them; so are values of the wrong type.
    """
    tables: dict[str, Any] = {}
    if path is not None:
        try:
            tables = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"--config {str(path)!r}: cannot read it ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {str(path)!r} is not valid TOML: {e}") from None
    unknown = sorted(k for k in tables if k not in _TABLES)
    if unknown:
        raise ConfigError(
            f"unknown table(s) or top-level key(s) {unknown} in {str(path)!r}; the file may hold only the "
            f"tables {sorted(f'[{t}]' for t in _TABLES)}"
        )
    not_tables = sorted(k for k, v in tables.items() if not isinstance(v, dict))
    if not_tables:
        raise ConfigError(f"{not_tables} in {str(path)!r} must be tables, written [name] on their own line")
    overrides = {k: v for k, v in train_overrides.items() if v is not None}
    tables["train"] = {**tables.get("train", {}), **overrides}
    built = {}
    for name, cls in _TABLES.items():
        values = tables.get(name, {})
        _check_types(cls, name, values)
        built[name] = from_mapping(cls, values, name)
    return RunConfig(**built)


# -- train ------------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, steps=args.steps, seed=args.seed, data_dir=args.data_dir)
    t, m = cfg.train, cfg.model
    _err(
        f"zetta-ray train: {t.steps} steps, batch {t.batch_size} x {m.seq_len} tokens, d_model {m.d_model}, "
        f"{m.n_layers} layers x {m.n_experts} experts over {t.expert_degree} units, seed {t.seed}"
    )
    bars: list[tqdm] = []  # made at the first step, so its rate ignores cluster and actor start-up

    def on_step(step: StepMetrics) -> None:
        if not bars:
            bars.append(tqdm(total=t.steps, file=sys.stderr, unit="step", dynamic_ncols=True))
        bars[0].set_postfix(loss=f"{step.loss:.3f}", tok_s=f"{step.tokens_per_s:,.0f}", refresh=False)
        bars[0].update(1)

    try:
        result = train(
            cfg.model, cfg.train, cfg.runtime, address=args.address, on_step=on_step, log=_err_above_bar
        )
    finally:
        for bar in bars:
            bar.close()
    if args.metrics_json:
        out = Path(args.metrics_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    print(result.summary() + (f"; metrics in {args.metrics_json}" if args.metrics_json else ""))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an MoE transformer on the standard-library corpus",
        description="Train zr.MoETransformer with its experts on Ray actors. Flags override --config.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML with [model], [train], [runtime] tables")
    p.add_argument("--steps", type=int, help="optimizer steps (TrainConfig.steps)")
    p.add_argument("--seed", type=int, help="seed for weights and data order (TrainConfig.seed)")
    p.add_argument("--data-dir", help="corpus directory (TrainConfig.data_dir; default: a cache dir)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--metrics-json", metavar="PATH", help="write per-step loss, step time, tokens/s, config")
    p.set_defaults(func=_cmd_train)


# -- entry point ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zetta-ray",
        description="zetta_ray: train Mixture-of-Experts models with every expert a Ray actor",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    return parser


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _err_above_bar(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        _err(f"zetta-ray {args.command}: error: {' '.join(str(e).split())}")
        return 2
    except ZettaError as e:
        _err(f"zetta-ray {args.command}: error: {type(e).__name__}: {' '.join(str(e).split())}")
        return 1
    except KeyboardInterrupt:
        _err(f"zetta-ray {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
