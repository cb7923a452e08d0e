"""Export (ONNX via jax2onnx, parity-checked) and the Triton model-repository writer.

Submodules are imported on use: `jaxclf.export.onnx` needs jax + onnx (training venv),
`jaxclf.export.triton` needs neither and also runs in the serving venv (.venv-serve).
"""
