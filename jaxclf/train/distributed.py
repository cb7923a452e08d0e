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

from jaxclf.config import ConfigError


class DistributedError(ConfigError):
  """A multi-process setting that cannot work; raised before any compute (the CLI prints it as
  one line, as it does every config error)."""


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
    # As gRPC's server does: the last run's connections in TIME_WAIT do not block a rerun on the
    # same port; a socket listening on it does.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def check_global_batch(batch_size: int, device_count: int, field: str = "train.batch_size",
                       grad_accum_steps: int = 1) -> None:
  if batch_size % device_count:
    raise DistributedError(f"{field}={batch_size} is not divisible by the {device_count} devices "
                           f"of the mesh (all processes together): use a multiple of {device_count}")
  k = grad_accum_steps
  if batch_size % (k * device_count):
    raise DistributedError(f"{field}={batch_size} is not divisible by train.grad_accum_steps={k} "
                           f"x the {device_count} devices: every micro-batch is sharded over all "
                           f"devices, so use a multiple of {k * device_count}")


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


def process_order(global_order: np.ndarray, global_batch: int, process_index: int,
                  process_count: int) -> np.ndarray:
  """This process's part of an epoch's global order: its rows of every full global batch, batch
  after batch, so that reading it in batches of global_batch / process_count gives local_indices
  of step 0, 1, 2, ... (the remainder that fills no global batch is dropped, as drop_remainder)."""
  n = len(global_order) // global_batch
  rows = local_rows(global_batch, process_index, process_count)
  return np.asarray(global_order)[:n * global_batch].reshape(n, global_batch)[:, rows].reshape(-1)


def local_part(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a host batch that every process holds whole (evaluation)."""
  import jax
  if jax.process_count() == 1:
    return dict(batch)
  n = len(next(iter(batch.values())))
  rows = local_rows(n, jax.process_index(), jax.process_count())
  return {k: v[rows] for k, v in batch.items()}


def assemble(local_batch, sharding):
  """The global batch from every process's rows (jax.make_array_from_process_local_data); with
  one process simply the batch on the mesh."""
  import jax
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def replicate(tree, sharding):
  """A pytree that every process holds identically (a seeded init, a restored checkpoint) as
  global arrays replicated over the mesh: built from each process's own copy, nothing is sent
  between processes. With one process, jax.device_put."""
  import jax
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree)


def check_resume_topology(saved: Mapping[str, Any] | None, where: str) -> None:
  """A checkpoint resumes with the process count that wrote it (recorded in its loop state)."""
  import jax
  if not saved or saved.get("process_count") in (None, jax.process_count()):
    return
  n = saved["process_count"]
  raise DistributedError(f"{where} was saved by {n} process(es), but this run has "
                         f"{jax.process_count()}: resume with distributed.num_processes={n}, or "
                         "train into a new workdir")


# What JAX's runtime prints when a job dies, and what it means (jax 0.10, XLA's coordination
# service). Checked against real runs of two processes on 127.0.0.1 (tests/test_distributed.py).
_FAILURES = (
    (re.compile(r"Task (\d+) heartbeat timeout|tasks are unhealthy \(stopped sending "
                r"heartbeats\):\s*(\d+)"),
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
    # A collective that broke before the heartbeat named the lost process.
    (re.compile(r"Gloo \w+ failed: .*(?:Connection closed by peer|Connection reset)"),
     "a peer process was lost in the middle of a step (its connection closed): the job "
     "stopped. Rerun the same commands on every host to resume from the last checkpoint."),
)


def explain_failure(log_tail: str, settings: Settings) -> str | None:
  """One line for a distributed job's abnormal end, from the log JAX printed; None if the log
  shows no distributed failure."""
  fields = dict(n=settings.num_processes, hb=settings.heartbeat_timeout_s,
                init=settings.init_timeout_s, coord=settings.coordinator)
  for pattern, message in _FAILURES:
    m = pattern.search(log_tail)
    if m:
      groups = [g for g in m.groups() if g is not None]  # the alternative that matched
      return f"process {settings.process_id}: " + message.format(*groups, **fields)
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
