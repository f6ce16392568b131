"""MLflow "model from code" entry: loading a logged student runs this file.

Logging the model by file instead of by object stores no pickle in the model:
MLflow runs this script (with the logged ``dmm`` snapshot on the path) and
takes the model it names.
"""

import mlflow.models

from dmm.registry.pyfunc import DMMStudentModel

mlflow.models.set_model(DMMStudentModel())
