"""segexp: experiment-tracked training for 2D medical image segmentation."""

import os

# segexp never phones home; a user can still opt in by setting the variable themselves.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# OpenMP threads that spin at barriers stall when another process holds a core: on 2 shared
# EPYC cores unet_buda trained 4x slower with 2 spinning threads than with 1; sleeping threads
# (PASSIVE) keep 2 threads at least as fast as 1 (`make bench`: omp row). Read at torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
