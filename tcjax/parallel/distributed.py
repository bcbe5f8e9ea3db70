"""Multi-host helpers: distributed initialisation and process-local -> global batches."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           **kwargs) -> bool:
  """Call `jax.distributed.initialize` when running multi-process; no-op for one process.

  Arguments default to env vars TCJAX_COORDINATOR, TCJAX_NUM_PROCESSES, TCJAX_PROCESS_ID. On TPU
  pods and SLURM / Open MPI clusters JAX auto-detects them: set TCJAX_DISTRIBUTED=1 and pass
  nothing. Returns True if it initialised.
  """
  coordinator_address = coordinator_address or os.environ.get("TCJAX_COORDINATOR")
  if num_processes is None and "TCJAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["TCJAX_NUM_PROCESSES"])
  if process_id is None and "TCJAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["TCJAX_PROCESS_ID"])
  auto = os.environ.get("TCJAX_DISTRIBUTED", "0") == "1"
  if not auto and (num_processes is None or num_processes <= 1):
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **kwargs)
  return True


def global_batch_from_local(local_batch, mesh, spec=P("data")):
  """Assemble each process's slice (a pytree of NumPy arrays, leading axis = local batch) into
  global `jax.Array`s sharded by `spec` over `mesh`."""
  sharding = NamedSharding(mesh, spec)
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)
