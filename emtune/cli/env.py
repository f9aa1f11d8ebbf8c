"""`emtune env`: the versions and hardware a bug report needs (like `transformers env`).

Python, the platform, emtune and the stack it runs on (torch, Ray, MLflow, Optuna, transformers,
peft, TRL, accelerate, datasets, pydantic), the GPUs torch sees, and the environment variables
emtune reads (values of variables that could hold secrets are never printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from typing import Any

from emtune.cli.output import add_format_argument, description, print_csv, print_json

PACKAGES = ("emtune", "torch", "ray", "mlflow", "optuna", "transformers", "peft", "trl", "accelerate", "datasets",
            "pydantic")
#: Environment variables emtune reads; shown as set or not (their values are addresses, not secrets).
VARIABLES = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "HF_HOME", "EMTUNE_CACHE_DIR",
             "CUDA_VISIBLE_DEVICES")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("env", help="print versions of Python, the stack and the GPUs (for bug reports)",
                       description=description(__doc__))
    add_format_argument(p, "item")
    p.set_defaults(func=main)


def environment() -> dict[str, Any]:
    """Every reported item, in print order."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    for name in PACKAGES:
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "not installed"
    info.update(_gpus())
    for name in VARIABLES:
        info[f"${name}"] = _masked(os.environ.get(name, "(not set)"))
    return info


def _masked(value: str) -> str:
    """An address with its credentials (``scheme://user:password@host``) masked."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", value)


def _gpus() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"gpu": "unknown (torch not installed)"}
    if not torch.cuda.is_available():
        return {"gpu": "none (CUDA not available to torch)", "torch cuda build": torch.version.cuda or "cpu"}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    memory = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1) for i in range(len(names))]
    return {"gpu": "; ".join(f"{n} ({m} GiB)" for n, m in zip(names, memory)), "gpu count": len(names),
            "torch cuda build": torch.version.cuda, "bf16 supported": torch.cuda.is_bf16_supported()}


def main(args: argparse.Namespace) -> int:
    """Print the environment."""
    info = environment()
    if args.format == "json":
        print_json(info)
    elif args.format == "csv":
        print_csv([{"item": k, "value": v} for k, v in info.items()])
    else:
        width = max(len(k) for k in info)
        print("\n".join(f"- {k + ':':<{width + 1}} {v}" for k, v in info.items()))
    return 0
