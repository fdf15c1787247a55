"""YAML presets, one folder per task: `retrieval/`, `ranking/`, `ctr/` (`merlin-hstu presets` lists them)."""
