"""Routers: a batch of input features -> a distribution over the experts (one file per router)."""
