"""distrib/transport/gpu."""
