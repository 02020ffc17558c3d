"""distrib/transport/hier."""
