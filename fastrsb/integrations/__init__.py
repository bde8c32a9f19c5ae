"""Adapters for the training loops people already use (optional extras: pip install fastrsb[lightning])."""
