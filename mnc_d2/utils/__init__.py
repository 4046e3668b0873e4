"""The bottom layer: errors, atomic file writing, RNG seeding and the Detectron2 install check. Imports nothing
else of mnc_d2."""
