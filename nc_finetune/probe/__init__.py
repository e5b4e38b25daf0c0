"""Layer-wise collapse probe."""
