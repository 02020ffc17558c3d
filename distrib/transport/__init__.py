"""distrib/transport."""
