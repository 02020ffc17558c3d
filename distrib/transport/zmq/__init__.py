"""distrib/transport/zmq."""
