"""Stage 7, the Optuna side: storages and the study lock (storage.py), the sampler snapped to Λ and
creating or resuming a study (study.py), a study's trials as rows and the rank rule's order over
them (trials.py), the checks before a study exists (prepare.py), one trial (objective.py), workers
sharing a study (worker.py), the after-study certificates (certification.py) and a whole run
(runner.py) — in that order, each importing only the ones before it. The after-study certificates
sit here rather than in ``certify`` because they read the study's trials and hold its lock; the
measurements they run are ``certify``'s.

May import: every stage above it (``track``, ``certify``, ``bound``, ``train``, ``data``,
``studyfile``) and the shared modules. Never ``advise`` or ``cli``.
"""
