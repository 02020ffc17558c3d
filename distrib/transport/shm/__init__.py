"""distrib/transport/shm."""
