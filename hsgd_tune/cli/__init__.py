"""Stage 9, the command line: argument parsing, the commands, and one-line errors (main.py, the
advisor's commands in advisor.py, several worker processes in workers.py). ``python -m hsgd_tune.cli``.

May import: anything in the package; nothing imports it.
"""
