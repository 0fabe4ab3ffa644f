"""The sparse autoencoder: its interface (``autoencoder``), file formats and presets (``formats``, ``presets``),
training on a model's residual stream (``training``, ``recipe``) and its quality figures (``quality``)."""
