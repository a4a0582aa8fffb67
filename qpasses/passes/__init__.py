"""Every registered pass, imported explicitly so registration order is deterministic."""
