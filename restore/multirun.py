"""Hydra callbacks for multiruns (registered in configs/hydra/default.yaml).

:class:`HydraConfigForMultirun`: Hydra 1.3 composes a multirun's config and then instantiates the sweeper and the
launcher before it installs that config in ``HydraConfig``, so anything they resolve through
``${hydra:runtime.cwd}`` fails with "HydraConfig was not set": here ``paths.root_dir``, hence the default
``hydra.sweep.dir`` and the SLURM launcher's ``submitit_folder`` (facebookresearch/hydra issues 1786 and 2247).
``on_multirun_start`` runs between the two steps; it installs the composed config, as Hydra itself does before
a single run (and as later Hydra releases do for multiruns: hydra-ecosystem/hydra pull request 3439).

:class:`FailedJobLogPaths`: hydra-submitit-launcher returns a failed job's exception to the submitting process,
which raises it there without saying where the job's log is (and the job's log has no traceback, as Hydra caught
the exception): this writes the traceback to the job's stderr file and names that file in a note on the exception
(PEP 678), which the launcher's error message prints.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class HydraConfigForMultirun(Callback):
    """Install the multirun's composed config in ``HydraConfig`` before the sweeper and launcher exist; each job
    still installs its own (``hydra.core.utils.run_job``), and the previous value is put back at the end."""

    def __init__(self) -> None:
        self._previous: DictConfig | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().cfg = self._previous


class FailedJobLogPaths(Callback):
    """In a submitit job that failed, note the job's stderr and stdout files on its exception."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or "SUBMITIT_EXECUTOR" not in os.environ:
            return
        import submitit  # only inside a submitit job

        paths = submitit.JobEnvironment().paths
        error = job_return._return_value  # the exception (the public getter re-raises it)
        if isinstance(error, BaseException):
            # Hydra caught it, so nothing reached the job's stderr: put the traceback there, then point to it
            traceback.print_exception(error, file=sys.stderr)
            sys.stderr.flush()
            error.add_note(f"job log: {paths.stderr} (traceback; stdout: {paths.stdout})")
