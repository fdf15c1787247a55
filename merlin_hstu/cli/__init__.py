"""The `merlin-hstu` command line: `main` builds the parser; `train`, `ranking` and `serving` add subcommands.

`entry` and `main` are forwarded lazily so that `python -m merlin_hstu.cli.main` (how the console script re-executes
itself under its malloc settings) does not find the module already imported."""


def entry() -> None:
    from merlin_hstu.cli.main import entry as run

    run()


def main(argv=None) -> int:
    from merlin_hstu.cli.main import main as run

    return run(argv)
