"""Data: sources -> (decode) -> splits -> Grain pipelines. See docs/architecture.md."""
