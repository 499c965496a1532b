"""The Python API's in-memory half: ``Labeler`` (labeling without Ray), ``LabelResult``, ``read_labels`` and
supervision interop. ``import hqlabel`` re-exports these names lazily (see ``hqlabel/__init__.py``)."""
