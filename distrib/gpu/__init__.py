"""distrib/gpu."""
