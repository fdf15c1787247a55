"""The `merlin-hstu` command line: `main` builds the parser; `ranking` and `serving` add their subcommands."""
from merlin_hstu.cli.main import entry, main  # noqa: F401
