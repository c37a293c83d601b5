"""Stage 2, the data: built-in datasets and CSV files, the S / H / V splits and their preprocessing
(datasets.py).

May import: ``studyfile``, ``errors``.
"""
