"""Exports of a trained model to other ecosystems (``muongpt export ...``)."""
