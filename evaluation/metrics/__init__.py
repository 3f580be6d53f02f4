"""Scoring a run: answer accuracy with bootstrap intervals, and fidelity to the uncompressed model."""
