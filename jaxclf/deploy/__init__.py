"""Orchestration between the stages: what moves a registry version into serving, and the gate
that decides whether a candidate may move at all. The registry below knows nothing of either.

  sync.sync_serving(registry, name, model_repository, triton_url=...) -> Triton serves the stage
  gate.run_gate(registry, name, candidate, ...) -> GateResult (promotes, or refuses with reasons)
"""
