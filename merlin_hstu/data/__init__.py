"""Event-log sources that are not tied to one task: the seeded synthetic event log (the embedded default dataset)."""
