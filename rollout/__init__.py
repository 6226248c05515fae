"""rollout: everything that touches nodes."""
