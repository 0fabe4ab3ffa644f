"""M1, the reference side: text collections (``corpus``), sentence embeddings (``embed``), the reference index
built from a model + SAE + corpus (``index`` and its storage), and topic scores (``scoring``)."""
