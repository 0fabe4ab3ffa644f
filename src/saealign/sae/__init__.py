"""The sparse autoencoder: its interface (``autoencoder``); reading public files (``formats`` dispatches to
``saelens``, ``openai_checkpoint``, ``gemma_scope``, ``releases``, sharing ``format_common``) and named
``presets``; training on a model's residual stream (``training`` runs it from ``train_config``,
``activations`` and ``topk_trainer``; ``recipe``, ``checkpoint``) and its quality figures (``quality``)."""
