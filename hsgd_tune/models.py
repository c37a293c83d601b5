"""The import path of :mod:`hsgd_tune.train.models` before the pipeline layout (issue #16), kept for
models already registered: the serving code logged with them (``advise/serving/predictor.py``, copied
into each model) imports ``ModelSpec`` and ``build_model`` from here for kinds it does not rebuild
itself, such as the CNN. New code imports ``hsgd_tune.train.models``."""

from hsgd_tune.train.models import ModelSpec, build_model

__all__ = ["ModelSpec", "build_model"]
