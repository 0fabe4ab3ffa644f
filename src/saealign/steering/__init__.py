"""M2, steering: one request as a ``spec``, the latent edits (``edits``, ``directions``), the request resolved
(``plan``), the sampling loop (``decoding``), the results (``generation``), the :class:`Aligner` (``aligner``)
and the automatic strength (``strength``)."""
