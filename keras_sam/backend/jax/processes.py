"""JAX across several processes (`keras.distribution` over the devices of
every process): what a failure there means.

The SAM step's collectives (the gradients' all-reduce) span every process.
When one process stops, the others' collective fails within seconds, and
JAX's distributed service, missing the lost process's heartbeats, names it
in its log and ends the others after `heartbeat_timeout_seconds` (an
argument of `jax.distributed.initialize`; 100 s by default, also under
`keras.distribution.initialize`). Nothing waits forever.
"""

from __future__ import annotations


def explain(error: BaseException) -> RuntimeError | None:
    """A clearer error for a collective that failed across processes, or
    None when `error` is something else."""
    import jax

    if jax.process_count() < 2 or type(error).__name__ not in (
            "JaxRuntimeError", "XlaRuntimeError"):
        return None
    return RuntimeError(
        f"Process {jax.process_index()} of {jax.process_count()}: a "
        "cross-process collective of the training step failed, most likely "
        "because another process stopped (crashed, killed or preempted). "
        "JAX's distributed service names the lost process in its log "
        "('Task N heartbeat timeout') and ends this one after its heartbeat "
        "timeout (`heartbeat_timeout_seconds` of jax.distributed.initialize, "
        "100 s by default). Restart every process; "
        "keras.callbacks.BackupAndRestore resumes from the last epoch. JAX "
        f"said: {str(error)[:300]}")
