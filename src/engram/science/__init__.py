"""The paper's experiments at CPU scale: sweep grids (`grids`), a resumable runner (`sweep`, `worker`) and
the report (`report`, `verdicts`). ``engram sweep`` and ``engram report`` are the entry points."""
