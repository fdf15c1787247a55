"""Pieces every task uses: column roles and tags, binary-classification metrics, atomic output directories, the malloc settings of the console script, config overrides."""
