"""Triton python-backend models. `jaxclf.export.triton_repository` copies these files into a
model repository as `<model>/<version>/model.py`; they run inside Triton's python stub (serving venv)."""
