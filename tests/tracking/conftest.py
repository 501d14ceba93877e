"""Shared MLflow fixtures (see tests/mlflow_helpers.py)."""

from tests.mlflow_helpers import empty_store, store_cfg  # noqa: F401
