"""The names of the tags segexp writes on its runs: every reader and writer uses these."""

PID = "segexp.pid"  # with HOST: whether a RUNNING run's process still lives
HOST = "segexp.host"
SLURM_JOB = "segexp.slurm_job_id"  # SLURM_JOB_ID of a job run by a SLURM launcher
ROLE = "segexp.role"  # "sweep" or "blame" on parent runs
CONFIG_HASH = "segexp.config_hash"  # what was trained, bookkeeping keys left out
CHOICES = "segexp.choices"  # the config-group options Hydra chose, as JSON
OUTPUT_DIR = "segexp.output_dir"  # checkpoints and Hydra's outputs
SWEEP_GRID = "segexp.sweep_grid"  # a sweep's task overrides: equal grids, same sweep
REUSED_BY_SWEEP = "segexp.reused_by_sweep"  # a FINISHED run a resumed sweep adopted
SEARCH_SPACE = "segexp.search_space"  # a search parent's: JSON list of `key=distribution`
SEARCH_SAMPLER = "segexp.search_sampler"  # a search parent's sampler `_target_`
RESUMED_WITH = "segexp.resumed_with"
FINGERPRINT = "dataset.fingerprint"  # the data a run saw: its files' list, sizes and mtimes
PARENT = "mlflow.parentRunId"
FIDELITY = "segexp.fidelity"  # a blame cell's: "screen" (low fidelity) or "full"
FIDELITY_DETAIL = "segexp.fidelity.detail"  # a screen's epochs, share of cases, image size
STORE = "segexp.store"  # the SQLite file that created the run: a copied store is not it
