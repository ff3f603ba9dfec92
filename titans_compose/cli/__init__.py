"""The command line (``titans-compose``)."""
