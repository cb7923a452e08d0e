"""Multi-process training on JAX's own distributed runtime (`jax.distributed`): nothing home-made.

`config.distributed` (all processes run the same command, differing only in `process_id`):
  coordinator          "host:port" of process 0; "" = one process; "auto" = jax.distributed's own
                       cluster detection (SLURM, Open MPI, Cloud TPU, Kubernetes with jax[k8s])
  num_processes        how many processes join (each sees its local devices; the mesh spans all)
  process_id           this process, 0 .. num_processes-1 (process 0 hosts the coordinator)
  init_timeout_s       how long every process waits for all of them to join
  heartbeat_timeout_s  how long a lost process takes to end the whole job

JAX ends a job whose process died (a heartbeat timeout) or that not every process joined by
aborting in C++, with a long log. `explain_failure` turns that log into one line that names the
process; the CLI prints it when the trainer exits abnormally. The data split per process is here
too: every process draws the same global, seeded index order and reads only its own contiguous
slice of each global batch, so N processes see the same examples per global step as one.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import re
import signal
import socket
import subprocess
import sys
from typing import Any, Mapping, Sequence

import numpy as np


class DistributedError(ValueError):
  """A multi-process setting that cannot work; raised before any compute."""


@dataclasses.dataclass(frozen=True)
class Settings:
  coordinator: str = ""
  num_processes: int = 1
  process_id: int = 0
  init_timeout_s: int = 300
  heartbeat_timeout_s: int = 60

  @classmethod
  def from_config(cls, section: Mapping[str, Any] | None) -> "Settings":
    section = dict(section or {})
    unknown = set(section) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise DistributedError(f"distributed: unknown key(s) {sorted(unknown)}")
    s = cls(**section)
    s.check()
    return s

  @property
  def enabled(self) -> bool:
    return bool(self.coordinator) or self.num_processes > 1

  @property
  def auto(self) -> bool:
    return self.coordinator == "auto"

  def host_port(self) -> tuple[str, int]:
    host, sep, port = self.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise DistributedError(f"distributed.coordinator={self.coordinator!r}: expected "
                             "'host:port' (e.g. 10.0.0.2:8476) or 'auto'")
    return host.strip("[]"), int(port)

  def check(self) -> None:
    if self.num_processes < 1:
      raise DistributedError(f"distributed.num_processes={self.num_processes}: must be >= 1")
    if not 0 <= self.process_id < self.num_processes:
      raise DistributedError(f"distributed.process_id={self.process_id}: must be in "
                             f"0..{self.num_processes - 1} (distributed.num_processes="
                             f"{self.num_processes})")
    if self.num_processes > 1 and not self.coordinator:
      raise DistributedError(f"distributed.num_processes={self.num_processes} needs "
                             "distributed.coordinator ('host:port' of process 0, or 'auto')")
    for key in ("init_timeout_s", "heartbeat_timeout_s"):
      if getattr(self, key) < 1:
        raise DistributedError(f"distributed.{key}={getattr(self, key)}: must be >= 1 second")
    if self.coordinator and not self.auto:
      self.host_port()


def check_coordinator_port(settings: Settings) -> None:
  """Process 0 binds the coordinator's port: a port already in use is one clear error now, not
  a hang until every other process's init timeout."""
  if settings.auto or settings.process_id != 0 or not settings.coordinator:
    return
  host, port = settings.host_port()
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as s:
    try:
      s.bind(("" if host not in ("127.0.0.1", "::1", "localhost") else host, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise DistributedError(f"distributed.coordinator={settings.coordinator}: port {port} is "
                               "already in use on this host (another job's coordinator?): "
                               "choose a free port for every process") from None
      raise


def initialize(settings: Settings) -> None:
  """jax.distributed.initialize with these settings (once per process, before any JAX compute)."""
  if not settings.enabled:
    return
  import jax
  check_coordinator_port(settings)
  kwargs = dict(initialization_timeout=int(settings.init_timeout_s),
                heartbeat_timeout_seconds=int(settings.heartbeat_timeout_s))
  if settings.auto:
    jax.distributed.initialize(**kwargs)
  else:
    jax.distributed.initialize(settings.coordinator, int(settings.num_processes),
                               int(settings.process_id), **kwargs)
  if jax.process_count() != settings.num_processes and not settings.auto:
    raise DistributedError(f"distributed.num_processes={settings.num_processes}, but "
                           f"{jax.process_count()} processes joined")


def topology(mesh=None) -> dict[str, Any]:
  """What run.json records: processes, devices and the mesh."""
  import jax
  out = {"process_count": jax.process_count(), "process_index": jax.process_index(),
         "local_device_count": jax.local_device_count(), "device_count": jax.device_count(),
         "platform": jax.devices()[0].platform}
  if mesh is not None:
    out["mesh"] = {name: int(size) for name, size in mesh.shape.items()}
  return out


def check_global_batch(batch_size: int, device_count: int, field: str = "train.batch_size") -> None:
  if batch_size % device_count:
    raise DistributedError(f"{field}={batch_size} is not divisible by the {device_count} devices "
                           f"of the mesh (all processes together): use a multiple of {device_count}")


def local_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """This process's contiguous rows of a global batch. The mesh orders devices by process, so
  the rows land on this process's own devices (`jax.make_array_from_process_local_data`)."""
  if global_batch % process_count:
    raise DistributedError(f"a global batch of {global_batch} does not split over "
                           f"{process_count} processes")
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)


def local_indices(global_order: np.ndarray, step: int, global_batch: int, process_index: int,
                  process_count: int) -> np.ndarray:
  """The example indices this process reads at `step`: its slice of global batch `step` of one
  seeded order that every process computes identically."""
  batch = np.asarray(global_order)[step * global_batch:(step + 1) * global_batch]
  return batch[local_rows(global_batch, process_index, process_count)]


# What JAX's runtime prints when a job dies, and what it means (jax 0.10, XLA's coordination
# service). Checked against real runs of two processes on 127.0.0.1 (tests/test_distributed.py).
_FAILURES = (
    (re.compile(r"Task (\d+) heartbeat timeout"),
     "process {0} of {n} was lost (no heartbeat for {hb} s): the job stopped. Rerun the same "
     "commands on every host to resume from the last checkpoint."),
    (re.compile(r"CoordinationService/RegisterTask"),
     "not all {n} processes joined the coordinator at {coord} within {init} s: check that "
     "distributed.num_processes ({n}) matches the processes started and that every host can "
     "reach {coord}."),
    (re.compile(r"coordination_service.*Socket closed|Connection reset by peer|"
                r"failed to connect to all addresses", re.S),
     "lost the coordinator (process 0 at {coord}): the job stopped. Rerun the same commands "
     "on every host to resume from the last checkpoint."),
)


def explain_failure(log_tail: str, settings: Settings) -> str | None:
  """One line for a distributed job's abnormal end, from the log JAX printed; None if the log
  shows no distributed failure."""
  fields = dict(n=settings.num_processes, hb=settings.heartbeat_timeout_s,
                init=settings.init_timeout_s, coord=settings.coordinator)
  for pattern, message in _FAILURES:
    m = pattern.search(log_tail)
    if m:
      return f"process {settings.process_id}: " + message.format(*m.groups(), **fields)
  return None


def run_supervised(cmd: Sequence[str], settings: Settings, env: Mapping[str, str] | None = None,
                   tail_lines: int = 200) -> int:
  """Runs one distributed trainer process as a child, passing its output through, and on an
  abnormal end prints `explain_failure`'s line last. Not a scheduler: each host still starts its
  own process (by hand, SLURM, a JobSet); this only makes JAX's C++ abort readable. SIGINT and
  SIGTERM reach the child."""
  child = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None,
                           stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
  forward = lambda signum, frame: child.send_signal(signum)
  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
  tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
  try:
    for line in child.stderr:
      sys.stderr.write(line)
      tail.append(line)
    rc = child.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if rc != 0:
    why = explain_failure("".join(tail), settings)
    if why:
      sys.stderr.write(f"\njaxclf: {why}\n")
  return rc if rc >= 0 else 128 - rc
