"""The ``slurm`` backend: interactive tools as Slurm batch jobs (see ``backend.py``).

:mod:`.jobs` submits, follows and cancels jobs and is reusable for batch work;
:mod:`.launcher` is the job's own body; :mod:`.options` the site options.
"""

from labgate.backends.slurm.backend import SlurmBackend

__all__ = ["SlurmBackend"]
