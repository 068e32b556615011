"""Requests, KV-cache blocks, scheduling, sampling and the step loop over the model."""
