"""M1, the reference side: text collections (the ``corpus`` value, read by ``corpus_spec`` from
``text_files``, ``wordnet`` or ``hf_datasets``), sentence embeddings (``embed``), the reference index
built from a model + SAE + corpus (``index`` and its storage), and topic scores (``scoring``)."""
