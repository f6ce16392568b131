"""Model registration: each merge is an MLflow run; the student is a pyfunc model version.

Importing this package is cheap: mlflow loads only when a submodule needs it.
The registry never imports dagster; the Dagster assets and any script call the
same functions with an explicit ``MlflowClient``.
"""
