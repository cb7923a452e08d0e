"""Run records (run.json) and comparison across runs."""
