"""Checkpoints: DeepSpeed's sharded save with our state attached as client_state."""
