"""Benchmark commands and their records (`merlin-hstu bench ...`)."""
