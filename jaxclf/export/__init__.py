"""Export (ONNX via jax2onnx, parity-checked) and the Triton model-repository writer.

Submodules are imported on use: `jaxclf.export.onnx` needs jax + onnx (training venv),
the Triton modules (`triton_config`, `triton_repository`, `triton_server`, `serving_env`, the
`triton` CLI) need neither and also run in the serving venv (.venv-serve).
"""
