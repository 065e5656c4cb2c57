"""Downstream evaluations of a trained model (``muongpt eval CHECKPOINT --task ...``)."""
