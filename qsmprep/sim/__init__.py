"""Simulation: head phantoms, forward model, multi-echo signal, hybrid training data."""
