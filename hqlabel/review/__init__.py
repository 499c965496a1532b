"""Looking at and correcting a labeling job's output, above the platform: the static gallery
(``gallery.py``), the overlay drawing (``render.py``, ``fonts.py``) and the review web app (``server.py``,
``items.py``, ``store.py``, ``fix.py``, ``page.py``)."""
