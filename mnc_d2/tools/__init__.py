"""Command-line tools: ``python -m mnc_d2.tools.demo`` (also ``mnc_d2.demo``), ``.export``, ``.analyze``. The top
layer: nothing in mnc_d2 imports them."""
