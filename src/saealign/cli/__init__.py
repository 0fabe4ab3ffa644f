"""The ``saealign`` command: ``app`` puts together ``prepare`` (info, train-sae, index), ``align`` (score,
generate, demo, serve) and ``evaluate`` / ``eval_paper`` (eval ...), which share ``common``."""
