"""Stage 1, the study file: TOML → a frozen, validated ``StudyConfig`` (config.py); the
configuration grid Λ, its weights π and the δ shares every statement is paid from (grid.py); a
config written back as a study file (export.py).

May import: ``hsgd_tune.errors`` only. Everything else builds on this.
"""
