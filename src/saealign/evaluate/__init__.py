"""The paper's evaluation (section 4 and appendix) on our models: metrics, experiments, reports.

Each experiment is a function returning plain rows (lists of dicts) and is reachable as a
``saealign eval`` subcommand that writes Markdown, CSV/JSON and PNG next to each other.
"""
