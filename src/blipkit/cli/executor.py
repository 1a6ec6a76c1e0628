"""`--executor local|ray` and the Ray flags of the bulk commands that run on the collection engine (`index`,
`caption --write`, `capfilt`): added to a parser, checked at the door into `RayOptions` (no cluster contacted but
the given address, no model loaded); the local executor's `--workers` and `--commit-seconds` refused with ray."""

from __future__ import annotations

import argparse

from ..errors import InputError

RAY_FLAGS = (("ray_address", "--ray-address", None), ("actors", "--actors", 1),
             ("gpus_per_actor", "--gpus-per-actor", 0.0), ("cpus_per_actor", "--cpus-per-actor", 1.0),
             ("commit_rows", "--commit-rows", None))


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """--executor and the Ray flags (shared by the bulk commands that run on the collection engine)."""
    g = p.add_argument_group("executor", "run locally (decoding processes + this process's model) or on Ray Data")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local (default) or ray: decoding in Ray tasks, the model in an actor pool")
    g.add_argument("--ray-address", metavar="ADDRESS",
                   help="a running Ray cluster (HEAD:6379, ray://HEAD:10001, auto); default: start a local Ray")
    g.add_argument("--actors", type=int, default=1, help="model replicas, one model per actor (default 1)")
    g.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPUs per actor (fractions share a GPU; default 0: CPU)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor, its torch threads (default 1)")
    g.add_argument("--commit-rows", type=int,
                   help="rows per commit with ray: a table version, or a capfilt part (default: --batch-size); "
                        "--commit-seconds and --workers are for --executor local")


def executor_options(args: argparse.Namespace):
    """The RayOptions of `--executor ray` (None for local), every flag checked; Ray flags need --executor ray."""
    if args.executor != "ray":
        given = [flag for name, flag, default in RAY_FLAGS if getattr(args, name) != default]
        if given:
            raise InputError(f"{', '.join(given)} apply to --executor ray: add --executor ray or drop them")
        return None
    if getattr(args, "workers", None) is not None:
        raise InputError("--workers is for --executor local (with ray, decoding runs in Ray tasks): drop it")
    if getattr(args, "commit_seconds", None) is not None:
        raise InputError("--commit-seconds is for --executor local (with ray, commits go by --commit-rows): drop it")
    from ..collections.ray_executor import OPTION_RULES, RayOptions, check_address, check_option, ray_module

    for name in OPTION_RULES:
        check_option(name, getattr(args, name), flag=True)
    ray_module()  # not installed, or no cluster at the address: a clear error before the model loads
    if args.ray_address is not None:
        check_address(args.ray_address)
    return RayOptions(args.ray_address, args.actors, args.gpus_per_actor, args.cpus_per_actor, args.commit_rows)
