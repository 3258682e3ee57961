"""Making a trained model smaller: quantised (quantize.py) and pruned (prune.py) exports,
each measured before and after on the same held-out windows (heldout.py)."""
