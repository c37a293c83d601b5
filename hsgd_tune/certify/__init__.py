"""Stage 5, torch-side measurements on a finished twin run: risks along both trajectories, L_pop,
the held-out, PAC-Bayes and perturbed certificates, α̂ (diagnostics.py), and the validation,
held-out and cross-fit loss estimates with their standard errors (estimates.py). Turning these
measurements into numbers is the bound engine's job (``bound``).

May import: ``bound``, ``train``, ``data``, ``studyfile``, ``errors``. Not Optuna, not MLflow.
"""
