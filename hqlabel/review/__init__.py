"""Looking at a labeling job's output, above the platform: the static gallery (``gallery.py``) and the
overlay drawing (``render.py``, ``fonts.py``)."""
