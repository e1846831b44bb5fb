"""Batching: the scheduler (policy), the works it batches, and the executors that compute them."""
