"""The core: components, the intervention engine, metrics, results and their files.

Nothing here imports from the layers above (``data``, ``methods``, ``circuits``,
``interface``); every method is built on these pieces.
"""
