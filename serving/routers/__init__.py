"""The gateway's routes, one module per audience: predict (clients), admin (operators with the
admin token), ops (probes, metrics, model info). Each exposes `create_*_router(gateway)`."""
