"""Ray, started or joined: shared by the fleet job, `train-safety` and `eval` (Ray is imported only when called)."""

from __future__ import annotations

import signal
import threading

from .errors import EnvironmentFailure, first_line


def init_ray(address: str | None = None, runtime_env: dict | None = None, quiet: bool = False) -> None:
    """Join the cluster named by `address` / RAY_ADDRESS / a local `ray start`, or start a local one.
    `quiet`: Ray's own INFO lines and the workers' output stay out of this process's output."""
    import logging

    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, runtime_env=runtime_env, ignore_reinit_error=True,
                     logging_level=logging.CRITICAL if quiet else logging.INFO, log_to_driver=not quiet)
        except (ConnectionError, ray.exceptions.RayError, RuntimeError) as exc:  # unreachable, bad token, ...
            raise EnvironmentFailure(f"cannot start or join Ray (address {address or 'auto'}): "
                                     f"{first_line(exc)}") from None
        _QUIET[0] = quiet
        if quiet:  # Ray's warnings and error reports (a lost worker's dump) too: the run reports what matters
            logging.getLogger("ray").setLevel(logging.CRITICAL)
        if threading.current_thread() is threading.main_thread():
            # Ray's own handler aborts the process; SIGTERM (`ray job stop`, an evicted pod) should end a
            # run as Ctrl-C does, with its run record written.
            signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


_QUIET = [False]  # how Ray was started: Ray Data, imported later, is told the same


def ray_data():
    """`ray.data`, its own log lines quiet: Ray Data reports its progress as INFO lines when stdout is not a
    terminal (ours is reported instead), and with `--quiet` says nothing but errors."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR if _QUIET[0] else logging.WARNING)
    if _QUIET[0]:
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray.data


def map_on_actors(ds, cls: type, kwargs: dict, batch_size: int, replicas: int, gpus: bool):
    """`ds` through a pool of `replicas` actors of `cls` (a model loaded once per actor), numpy batches.

    No actor restarts (Ray Data's default is endless): an actor that dies loading its model would be
    restarted forever, and Ray cannot honour restarts of actors whose constructor arguments live in the
    object store, as Ray Data's do (ray-project/ray#53727). A lost actor fails the work; the gate then
    publishes nothing, and the next run evaluates again."""
    import warnings

    with warnings.catch_warnings():  # max_restarts has no named parameter yet; Ray's own docs name this one
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                              compute=ray_data().ActorPoolStrategy(size=replicas), num_gpus=1 if gpus else 0,
                              num_cpus=1, batch_format="numpy", max_restarts=0)


def threads_each(replicas: int) -> int:
    """Torch threads for each of `replicas` CPU actors: the cluster's free CPUs shared among them. Ray starts an
    actor that asks for one CPU with one thread (OMP_NUM_THREADS=1); asking for more could leave it waiting for
    CPUs other actors hold, so the actors ask for one and set their threads themselves (capped by their node's)."""
    import ray

    return max(1, int(ray.available_resources().get("CPU", 0) // max(1, replicas)))


def cluster_gpus() -> float:
    """GPUs in the cluster Ray is connected to."""
    import ray

    return ray.cluster_resources().get("GPU", 0)
