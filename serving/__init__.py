"""Serving: start/stop TorchServe and the private PostgreSQL; model version rollouts."""
