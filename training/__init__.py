"""Training the nested-attention weights: `python -m training.train`."""
