"""Stage 8, the advisor: the ranking and its recommendation (ranking.py), the end-of-run summary
(summary.py), the report (report.py, report_page.py, correlation.py), the champion promoted to the
MLflow registry (pick.py, serving/) and the UIs (ui.py).

May import: ``search`` and every stage above it. Never ``cli``.
"""
