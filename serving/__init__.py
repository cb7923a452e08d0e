"""The serving edge: REST gateway (app.py), backends (onnxruntime | Triton), drift monitoring,
and the `jaxclf serve` / `jaxclf predict` commands (predict_cli.py).

Imports here stay lazy: `jaxclf --help` must not pull in FastAPI or onnxruntime.
"""
