"""segexp: experiment-tracked training for 2D medical image segmentation."""

import os

# segexp never phones home; a user can still opt in by setting the variable themselves.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

__version__ = "0.1.0"
