"""torchgc's command line: ``torchgc <command> ...`` or ``python -m torchgc <command> ...``.

Each command registers itself in COMMANDS with a function that adds its subparser.
"""

import argparse
import atexit
import os
import runpy
import shutil
import sys
from typing import Callable, List, Optional, Tuple

from torchgc import config


def _add_patch_options(parser: argparse.ArgumentParser) -> None:
    """The options of torchgc.patch(); one left out comes from its TORCHGC_* variable."""
    group = parser.add_argument_group("torchgc options (default: the TORCHGC_* environment variable, else torchgc's default)")
    group.add_argument("--strategy", choices=config.STRATEGIES, help="checkpointing strategy (default: auto)")
    flags = {
        "use_reentrant": "reentrant checkpointing (default: as the installed transformers)",
        "only_trainable": "call layers whose parameters are all frozen directly (default: on)",
        "prefetch": "reload offloaded inputs ahead of use (default: on)",
        "upcast_layernorm": "norm weights in fp32 (default: off)",
        "fused_norm": "fused fp32 norm kernels (default: off)",
        "upcast_lmhead_output": "lm_head output in fp32 (default: off)",
    }
    for name, help_text in flags.items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
    # Sizes stay text here: torchgc.patch() parses "2MiB" and names the option when it cannot.
    group.add_argument("--min-offload-bytes", dest="min_offload_bytes", metavar="SIZE", help="smallest input to offload (default: 2MiB)")
    group.add_argument("--memory-budget", dest="memory_budget", metavar="BUDGET",
                       help="plan a mode per layer within this activation memory: a fraction of it without checkpointing (0.3) or a size (12GiB)")
    group.add_argument("--every-n-layers", dest="every_n_layers", type=int, metavar="N",
                       help="checkpoint only layers 0, N, 2N, ... as transformers' every_n_layers does (default: 1, every layer)")
    group.add_argument("--max-host-bytes", dest="max_host_bytes", metavar="SIZE", help="stop offloading while this much host memory is in use (default: no cap)")


def _add_run(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a program with torchgc.patch() applied, in every Python process it starts",
        description="Applies torchgc.patch(), then runs the script, console script (llamafactory-cli, torchrun, "
        "accelerate) or -m module as __main__ with its arguments, so an unmodified training program checkpoints "
        "through torchgc. Any other executable (python itself, a shell script) runs in place of this process. Python "
        "processes started either way (torchrun and accelerate workers, the script behind the executable) are patched "
        "with the same options.",
    )
    _add_patch_options(parser)
    parser.add_argument("--report", metavar="DIR", help="at exit, write what torchgc did (checkpoint calls by strategy and layer, "
                        "bytes offloaded, fused norm calls) to DIR/torchgc-<pid>.json, from this process and every one it starts")
    # As with `python -m`, everything after the script or after `-m MODULE` is the program's own.
    parser.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE ...", help="run a module, as python -m does")
    parser.add_argument("target", metavar="script.py", nargs="?",
                        help="the script to run, a console script on PATH, or any executable (python, /path/to/python, a shell script)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    parser.set_defaults(handler=_run)


STARTUP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_startup")


def _export_to_child_processes(given: dict) -> None:
    """Child Python processes (torchrun workers, ...) read the options from TORCHGC_* variables and
    patch themselves through the sitecustomize in STARTUP_DIR (see there)."""
    for name, value in given.items():
        if value is not None:
            os.environ[config.env_var(name)] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = STARTUP_DIR + (os.pathsep + path if path else "")


def _find_program(name: str) -> Tuple[str, bool]:
    """The program's path, and whether it is Python that runs in this process (a script, a console
    script, a folder or zip with __main__.py) rather than an executable to run in its place."""
    path = name if os.path.exists(name) else shutil.which(name)
    if path is None:
        raise SystemExit(f"torchgc run: no such script or executable: {name}")
    in_process = os.path.isdir(path) or _is_python_source(path) or not os.access(path, os.X_OK)
    return path, in_process


def _is_python_source(path: str) -> bool:
    if path.endswith((".py", ".pyw", ".pyz")):
        return True
    with open(path, "rb") as f:
        first = f.read(256).split(b"\n", 1)[0]
    return first.startswith(b"#!") and b"python" in first


def _run(args: argparse.Namespace) -> int:
    import torchgc

    options = {name: getattr(args, name) for name in config.OPTION_NAMES}
    if args.module is None and args.target is None:
        raise SystemExit("torchgc run: give a script to run, or -m MODULE")
    if args.module is not None and not args.module:
        raise SystemExit("torchgc run: -m needs a module name, as in: torchgc run -m MODULE [args ...]")
    program, in_process = _find_program(args.target) if args.module is None else (None, True)
    if in_process:
        torchgc.patch(**options)
    else:
        config.resolve("torchgc run", options)  # a bad option stops here, not in the program's first Python process
    _export_to_child_processes(options)
    if args.report:
        os.environ[config.REPORT_VARIABLE] = os.path.abspath(args.report)
        if in_process:
            atexit.register(torchgc.counters.write_report, os.path.abspath(args.report))
    if not in_process:
        # The executable replaces this process (its exit status and signals are its own); the Python
        # processes it starts patch themselves from the environment, as torchrun's workers do.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(program, [args.target, *args.args])
    if args.module is not None:
        module, *module_args = args.module
        sys.argv = [module, *module_args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    sys.argv = [program, *args.args]
    # As `python script.py` does: the script's directory comes first on the import path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(program)))
    runpy.run_path(program, run_name="__main__")
    return 0


def _add_bench(subparsers) -> None:
    from torchgc import bench

    parser = subparsers.add_parser("bench", help="memory and step time of every checkpointing strategy", description=bench.cli.DESCRIPTION)
    bench.build_parser(parser)
    parser.set_defaults(handler=lambda args: bench.main(args=args))


def _add_plan(subparsers) -> None:
    from torchgc.bench import plan_command

    parser = subparsers.add_parser("plan", help="the per-layer plan of a memory budget, predicted and measured",
                                   description=plan_command.DESCRIPTION)
    plan_command.build_parser(parser)
    parser.set_defaults(handler=lambda args: plan_command.main(args=args))


COMMANDS: List[Callable] = [_add_run, _add_bench, _add_plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchgc", description="torchgc: gradient checkpointing for LLM fine-tuning")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
