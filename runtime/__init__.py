"""Loading and running converted models; image preprocessing; memory planning."""
