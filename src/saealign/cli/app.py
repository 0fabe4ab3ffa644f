"""The ``saealign`` command: a thin layer that parses, calls the library and prints.

Each command group lives in its own module and knows nothing of this one; here they are put
together (``prepare``: info, train-sae, index; ``align``: score, generate, demo, serve;
``evaluate``: eval ...). User mistakes surface as one line, never a traceback (:func:`~saealign.cli.common.friendly`).
"""

from __future__ import annotations

import click

from saealign.cli.align import demo_cmd, generate_cmd, score_cmd, serve_cmd
from saealign.cli.evaluate import eval_group
from saealign.cli.prepare import index_group, info_cmd, train_sae_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saealign")
def main() -> None:
    """Align a language model's generations to any topic by editing a sparse autoencoder inside it."""


for command in (info_cmd, train_sae_cmd, index_group, score_cmd, generate_cmd, demo_cmd, serve_cmd, eval_group):
    main.add_command(command)
