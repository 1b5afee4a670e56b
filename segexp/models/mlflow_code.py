"""The code of segexp's MLflow models (models from code): SegModel, built from the artifacts.

MLflow stores a copy of this file with each model and runs it in `mlflow.pyfunc.load_model`;
segexp itself never runs a stored copy (tracking.registry checks it is this file, byte for byte).
"""

from mlflow.models import set_model

from segexp.models.pyfunc import SegModel

set_model(SegModel())
