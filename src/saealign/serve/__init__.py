"""The HTTP API and page (``app``): request ``schemas``, shared ``state``, ``routes``, the model worker
(``batching``) and the HTTP plumbing (``http``). Needs the ``serve`` extra."""
