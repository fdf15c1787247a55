"""`merlin-hstu bench cli`: how fast the command line answers `--help`, and what it imports to do so.

Each command's `--help` runs in a fresh interpreter (the console script, as a user types it), `--repeats` times;
the table shows the median and the worst wall time, and whether torch / NVTabular / Transformers4Rec were
imported on the way (they cost seconds each, so `--help` must never need them).  The target is < 1 s per command.

    merlin-hstu bench cli                     # every subcommand
    merlin-hstu bench cli --commands train serve --repeats 5
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import List, Optional

HEAVY_MODULES = ("torch", "nvtabular", "transformers4rec", "merlin.io", "pandas")
TARGET_SECONDS = 1.0

# A probe run by `python -c`: builds the parser exactly as the console script does, prints the heavy modules
# that are loaded afterwards.
_PROBE = (
    "import sys; from merlin_hstu.cli.main import build_parser; p = build_parser();\n"
    "argv = sys.argv[1:]\n"
    "try:\n    p.parse_args(argv + ['--help'])\nexcept SystemExit:\n    pass\n"
    "print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n"
)


def subcommands() -> List[str]:
    """The top-level subcommand names, read from the parser (so a new command is measured automatically)."""
    from merlin_hstu.cli.main import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps subparsers here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    return []


def heavy_imports(command: Optional[str]) -> List[str]:
    """Heavy modules imported while building the parser and printing `[command] --help`."""
    argv = [command] if command else []
    probe = _PROBE.format(heavy=HEAVY_MODULES)
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
    line = [x for x in out.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


def time_help(command: Optional[str], repeats: int) -> List[float]:
    exe = shutil.which("merlin-hstu", path=os.path.dirname(sys.executable)) or shutil.which("merlin-hstu")
    base = [exe] if exe else [sys.executable, "-m", "merlin_hstu.cli.main"]
    argv = base + ([command] if command else []) + ["--help"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return times


def run(args) -> int:
    commands = [None] + (args.commands or subcommands())
    print(f"{'command':<40} {'median s':>9} {'max s':>7}  heavy imports")
    slow = 0
    for command in commands:
        times = time_help(command, args.repeats)
        heavy = heavy_imports(command)
        label = f"merlin-hstu {command + ' ' if command else ''}--help"
        worst = max(times)
        slow += worst >= TARGET_SECONDS or bool(heavy)
        print(f"{label:<40} {statistics.median(times):>9.2f} {worst:>7.2f}  {', '.join(heavy) or '-'}", flush=True)
    print(f"{len(commands)} commands, {args.repeats} runs each; target < {TARGET_SECONDS:.0f} s and no heavy "
          f"import: {'all met' if not slow else f'{slow} missed'}")
    return 0 if not slow else 1


def register_subcommands(subparsers, bench_subparsers) -> None:
    """Hook for merlin_hstu.cli.main.EXTENSION_MODULES: adds `bench cli`."""
    p = bench_subparsers.add_parser("cli", help="time `--help` of every command in fresh processes (target < 1 s)",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commands", nargs="+", metavar="COMMAND", help="only these subcommands (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per command (default: 3)")
    p.set_defaults(func=run)
