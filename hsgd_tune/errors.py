"""The few exceptions hsgd_tune raises on purpose.

Each expected failure names the file, the key, the rule and the value, so the CLI can print one
line and exit non-zero without a traceback (DESIGN.md §3, "Errors").
"""

from __future__ import annotations

from pathlib import Path


class HsgdError(Exception):
    """An expected failure whose message is fit to show the user as one line."""


class ConfigError(HsgdError, ValueError):
    """A study file (or a value derived from it) breaks a rule.

    ``file`` may be filled in later by the caller that knows which study file was read.
    """

    def __init__(self, key: str, rule: str, value: object, file: str | Path | None = None):
        self.key, self.rule, self.value, self.file = key, rule, value, file
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.file}: " if self.file is not None else ""
        return f"{where}{self.key}: {self.rule}, got {self.value!r}"

    def in_file(self, file: str | Path) -> ConfigError:
        """Return the same error, attributed to the study file ``file``.

        An error already attributed to another file (a CSV the study names) keeps that file in
        its rule, so the line names both: ``study.toml: data.target: ... (in data.csv), got ...``.
        """
        if self.file is not None and Path(self.file) != Path(file):
            self.rule = f"{self.rule} (in {self.file})"
        self.file = file
        self.args = (self._message(),)
        return self

    def __str__(self) -> str:
        return self._message()


class DataError(ConfigError):
    """The data named by a study file is missing or unusable (missing CSV, bad column, ...)."""


class DivergedError(HsgdError, RuntimeError):
    """Training left the finite, bounded regime; the trial fails with this reason."""

    def __init__(self, reason: str, step: int):
        self.reason, self.step = reason, step
        super().__init__(f"diverged at step {step}: {reason}")


class StorageError(HsgdError):
    """An Optuna storage or MLflow tracking store cannot be used."""
