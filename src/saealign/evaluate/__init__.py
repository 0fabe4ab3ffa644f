"""The paper's evaluation (section 4 and appendix) on our models: metrics, experiments, reports.

Each experiment is a library function that takes a :class:`~saealign.evaluate.workbench.Workbench`
(what a run shares: models, fine-tuned baselines, the acceptability classifier) and returns a
:class:`~saealign.evaluate.report.Table`; ``saealign eval ...`` parses options, calls it and writes
the Markdown, CSV/JSON and PNG files.
"""
