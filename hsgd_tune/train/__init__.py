"""Stage 3, twin training: the models (MLP, CNN, entry points; models.py) and their pre-study check
(model_check.py), the twin SGD run — the empirical run on S and the reference run on H, in lock step
— with per-example gradient norms (twin.py), Lévy noise (noise.py) and the sign sketch of long
trajectories (sketch.py).

May import: ``data``, ``studyfile``, ``errors``, ``progress``.
"""
