"""Stage 6, MLflow: the tracking store and its URIs, experiments, runs, batched logging, artifacts
(tracker.py) and links into the MLflow UI's views (views.py).

May import: ``errors``, ``redact``. Nothing of the pipeline: it records, it does not compute.
"""
