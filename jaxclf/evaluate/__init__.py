"""Evaluation: metrics (metrics.py), plots (plots.py), training curves (curves.py), the HTML
report (report.py), the metrics.json schema (schema.py), temperature scaling (calibration.py:
`fit_temperature`, `calibrate`) and the `jaxclf evaluate` command (evaluate.py:
`evaluate_model(model_path, test_data, out_dir)`, over model_loader.py, held_out.py and scoring.py).

Submodules are imported on use: `jaxclf.evaluate.metrics` needs numpy (scikit-learn only inside
`compute_metrics`); `jaxclf.calibration` numpy and, when fitting, scipy; neither jax.
"""
