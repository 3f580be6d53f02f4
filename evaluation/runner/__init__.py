"""Running presses: one run, a sweep of presses x ratios, the press registry, kvpress's own evaluate.py."""
