"""HQ-token retraining (Ray Train), losses and metrics."""
