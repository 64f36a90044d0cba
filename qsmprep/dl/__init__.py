"""Deep-learning QSM methods (PyTorch): networks, inference, weights registry."""
