"""`merlin-hstu train --nproc N` and the multi-node flags -> torchrun (`python -m torch.distributed.run`).

    merlin-hstu train ... --nproc 2                                   # one machine, 2 processes
    merlin-hstu train ... --nproc 8 --nnodes 2 --node-rank 0 --rdzv-endpoint host0:29500    # on host0
    merlin-hstu train ... --nproc 8 --nnodes 2 --node-rank 1 --rdzv-endpoint host0:29500    # on host1

Without --nproc the command trains in the process itself, as always. With it, the command re-runs itself under torchrun with the same arguments minus these four flags: every process then
trains through the one loop (`merlin_hstu.train.loop.fit`), which joins the process group torchrun describes.
One node without an endpoint uses torchrun's `--standalone` rendezvous (a free local port); several nodes need
`--rdzv-endpoint HOST:PORT` (node 0's address and a free port: torchrun's static rendezvous, its `--master-addr` /
`--master-port`, hosted by node 0) and the same `--nnodes` on each. Static, not c10d, because c10d gives nodes
their ranks in order of arrival and ignores `--node-rank`; here node I's N processes are global ranks I*N ..
I*N + N - 1, so node 0 holds rank 0, which writes the run directory.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional, Sequence

LAUNCH_FLAGS = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("several processes / machines (torchrun underneath; docs/scaling.md)")
    g.add_argument("--nproc", type=int, metavar="N",
                   help="training processes on this machine, started by torchrun (default: one plain process, no "
                        "torchrun; --nproc 1 is one process under torchrun, e.g. to resume a sharded run's "
                        "checkpoint). Each trains on its slice of "
                        "every global batch; torchrec tables (--set model.embeddings=torchrec) are sharded across "
                        "all processes (--set train.sharding=auto|table_wise|row_wise|column_wise)")
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines taking part (default 1)")
    g.add_argument("--node-rank", type=int, default=0, metavar="I", help="this machine's index, 0..M-1")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="where the machines meet: node 0's address and a free port, the same on every machine "
                        "(required with --nnodes > 1; e.g. host0:29500). Node 0 holds rank 0, which writes the run")


def check_launch_arguments(args) -> None:
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc is None and (args.nnodes > 1 or args.rdzv_endpoint):
        raise ValueError("--nnodes / --rdzv-endpoint need --nproc N (the processes on each machine)")
    if args.nnodes < 1:
        raise ValueError(f"--nnodes must be >= 1, got {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank must be in [0, --nnodes={args.nnodes}), got {args.node_rank}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every machine)")
    if args.rdzv_endpoint and (":" not in args.rdzv_endpoint or not args.rdzv_endpoint.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"--rdzv-endpoint must be HOST:PORT, got {args.rdzv_endpoint!r}")


def wants_launch(args) -> bool:
    """True when --nproc is given and this process was not started by torchrun."""
    from merlin_hstu.distributed.context import launched

    check_launch_arguments(args)
    return args.nproc is not None and not launched()


def argv_from_args(parser: argparse.ArgumentParser, args, skip: Sequence[str] = LAUNCH_FLAGS) -> List[str]:
    """The command-line arguments that parse to `args` under `parser` (options only; values not at their default,
    repeated options repeated), leaving out the dests in `skip`."""
    out: List[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value or []:
                out += [flag, str(item)]
        elif value is not None and value != action.default:
            out += [flag, str(value)]
    return out


def torchrun_command(args, child: Sequence[str]) -> List[str]:
    """`python -m torch.distributed.run ... -m merlin_hstu.cli.main <child>`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--nnodes", str(args.nnodes)]
    if args.rdzv_endpoint:  # static rendezvous: node I's processes are global ranks I*N .. I*N+N-1, so node 0 holds
        host, port = args.rdzv_endpoint.rsplit(":", 1)  # rank 0 (the run directory, the printed report)
        cmd += ["--node-rank", str(args.node_rank), "--master-addr", host, "--master-port", port]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "merlin_hstu.cli.main", *child]


def relaunch(args, parser: argparse.ArgumentParser, command: str = "train",
             env: Optional[dict] = None) -> int:
    """Run `command` again under torchrun with `args` minus the launch flags; its exit status."""
    cmd = torchrun_command(args, [command, *argv_from_args(parser, args)])
    print(f"starting {args.nproc} process(es) on node {args.node_rank} of {args.nnodes}: {' '.join(cmd[1:])}",
          flush=True)
    return subprocess.call(cmd, env={**os.environ, **(env or {})})


def is_rank0() -> bool:
    """False in a torchrun process of rank > 0 (before the process group is joined: from the environment)."""
    return os.environ.get("RANK", "0") == "0"


def quiet_unless_rank0() -> bool:
    """In a torchrun process of rank > 0, send stdout to /dev/null (rank 0 reports; errors still reach stderr).
    True when it did."""
    if is_rank0():
        return False
    sys.stdout = open(os.devnull, "w")
    return True
