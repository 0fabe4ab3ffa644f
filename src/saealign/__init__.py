"""saealign: align a language model's generations to any topic by editing a sparse autoencoder inside it.

Modules: ``models`` (LMs, layer L), ``sae`` / ``sae_loaders`` (the SAE interface and file formats),
``train`` (TopK SAE training), ``corpus`` / ``embed`` (texts, sentence embeddings), ``index``
(the reference index), ``scoring`` (M1), ``steer`` (M2 edits), ``generate`` (the ``Aligner``).
"""

__version__ = "0.1.0"
