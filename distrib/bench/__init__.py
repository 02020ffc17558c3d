"""distrib/bench."""
