"""When a periodic action fires: one rule for logging, checkpoints, evaluators, early stopping,
summaries and anything added later (big_vision's `u.steps` + `u.itstime`, big_vision/utils.py).

A rule is a string: "<N> steps", "<N> epochs" (fractions allowed: "0.5 epochs"), "<N>%" (of all
training steps), or "" (never). `Every.parse(rule).interval(steps_per_epoch, total_steps)` turns it
into a step interval, so the loop only ever counts steps; `itstime` decides each step.
"""
from __future__ import annotations

import dataclasses
import re

_RULE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(steps?|epochs?|%)\s*$")
RULE_HELP = "'<N> steps', '<N> epochs', '<N>%' (of training) or '' (never)"


class RuleError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Every:
  n: float = 0.0
  unit: str = ""  # steps | epochs | % ; "" = never

  @classmethod
  def parse(cls, rule: str) -> "Every":
    rule = str(rule or "").strip()
    if not rule:
      return cls()
    m = _RULE.match(rule)
    if not m:
      raise RuleError(f"{rule!r} is not a periodic rule: use {RULE_HELP}")
    n, unit = float(m.group(1)), m.group(2).rstrip("s") + ("s" if m.group(2) != "%" else "")
    if n <= 0 or (unit == "steps" and n != int(n)) or (unit == "%" and n > 100):
      raise RuleError(f"{rule!r}: need a whole number of steps > 0, epochs > 0 or 0 < % <= 100")
    return cls(n, unit)

  def interval(self, steps_per_epoch: int, total_steps: int) -> int:
    """Steps between firings; 0 = never. Rounded to the nearest step, at least 1 (u.steps)."""
    if not self.unit:
      return 0
    raw = {"steps": self.n, "epochs": self.n * steps_per_epoch,
           "%": self.n / 100.0 * total_steps}[self.unit]
    return max(1, round(raw))


def itstime(step: int, every_n_steps: int, total_steps: int, *, last: bool = True,
            first: bool = False) -> bool:
  """big_vision's u.itstime without hosts: every `every_n_steps`, plus the last step (`last`) and
  step 1 (`first`). An interval of 0 never fires. (Multi-process: call only where a process
  should act, e.g. writes on process 0; the rule itself is the same on every process.)"""
  if not every_n_steps:
    return False
  return step % every_n_steps == 0 or (last and step == total_steps) or (first and step == 1)
