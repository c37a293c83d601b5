"""The production model: a complete predictor, logged with MLflow's pyfunc flavour "from code".

:func:`log_predictor` logs, in the active MLflow run, the code file :mod:`hsgd_tune.advise.serving.predictor`
together with three plain files as the model's artifacts: the network's ``state_dict`` (tensors only),
its spec (JSON) and the data's preprocessing (JSON: feature names, H's means and scales, class
labels, target scaling; :meth:`hsgd_tune.data.datasets.Dataset.preprocessing`). Nothing is pickled, so
``mlflow.pyfunc.load_model`` needs no pickle and warns of none. The signature names every feature
column; the input example is one row of H's feature means (a valid raw row that copies no example
of the data into the model).

Loaded back, the model takes raw rows and answers in the data's own terms (see predictor.py); the
torch module is ``mlflow.pyfunc.load_model(uri).unwrap_python_model().module``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hsgd_tune.data.datasets import Dataset
from hsgd_tune.train.models import ModelSpec

#: The models-from-code file MLflow copies into every logged model.
PREDICTOR = Path(__file__).with_name("predictor.py")
#: Where the model sits inside its run's artifacts.
MODEL_NAME = "model"


def log_predictor(model: torch.nn.Module, spec: ModelSpec, data: Dataset, registered_name: str | None = None):
    """Log ``model`` (trained on ``data``'s preprocessing) as a pyfunc predictor in the active run;
    with ``registered_name``, register it as a new version of that model. Returns MLflow's
    ``ModelInfo`` (``registered_model_version`` names the version)."""
    import mlflow

    # MLflow checks the input example by loading the model back: no progress bar for that.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="hsgd-model-") as tmp:
        folder = Path(tmp)
        torch.save(model.state_dict(), folder / "state_dict.pt")
        (folder / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2), encoding="utf-8")
        (folder / "preprocessing.json").write_text(
            json.dumps(data.preprocessing(), indent=2), encoding="utf-8"
        )
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(PREDICTOR),
            artifacts={
                "weights": str(folder / "state_dict.pt"),
                "spec": str(folder / "spec.json"),
                "preprocessing": str(folder / "preprocessing.json"),
            },
            signature=signature(data),
            input_example=input_example(data),
            registered_model_name=registered_name,
            # Pinned, so MLflow need not load the model in a subprocess to infer its requirements.
            pip_requirements=requirements(),
        )


def signature(data: Dataset):
    """Inputs: one named column per feature, any numeric type (MLflow would refuse integer columns
    for a ``double`` column, e.g. a JSON request of whole numbers; the predictor checks each value).
    Outputs: ``prediction`` (a class label or the target in its units) and, for classification,
    ``probability[<label>]`` per class (as predictor.probability_column names them; predictor.py is
    not imported here, since importing it sets MLflow's model-from-code global)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema([ColSpec(AnyType(), name) for name in data.feature_names])
    if data.task == "regression":
        return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "prediction")]))
    outputs = [ColSpec(_label_type(data.classes), "prediction")]
    outputs += [ColSpec("double", f"probability[{label}]") for label in data.classes]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def _label_type(classes: tuple) -> Any:
    """MLflow's type for the original labels (all of one Python type), else any."""
    from mlflow.types.schema import AnyType

    by_type = {bool: "boolean", int: "long", float: "double", str: "string"}
    kinds = {by_type.get(type(c)) for c in classes}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else AnyType()


def input_example(data: Dataset) -> pd.DataFrame:
    """One raw row: H's feature means, column by column."""
    return pd.DataFrame([np.asarray(data.x_mean, dtype=np.float64)], columns=list(data.feature_names))


def requirements() -> list[str]:
    import mlflow

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
    ]


def data_fingerprint(data: Dataset) -> str:
    """sha256 (first 16 hex digits) of the rows a model was trained and checked on (S, H, V, as the
    network sees them) and of the preprocessing that maps raw rows to them."""
    digest = hashlib.sha256(json.dumps(data.preprocessing(), sort_keys=True, default=str).encode())
    for split in (data.train, data.reference, data.val):
        digest.update(np.ascontiguousarray(split.x).tobytes())
        digest.update(np.ascontiguousarray(split.y).tobytes())
    return digest.hexdigest()[:16]
