"""Entry script of the logged pyfunc ("models from code"): MLflow runs it to build the model.

The task and predictor loader come from the model's `model_config`, so no pickled
object travels with the model.
"""

import mlflow.models

from vlp.serving import VLPTaskModel

mlflow.models.set_model(VLPTaskModel())
