"""Layer 1: pure protocol logic, no I/O and no clock."""
