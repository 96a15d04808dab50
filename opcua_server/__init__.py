"""The OPC UA server and the application's composition root (``tempering`` command)."""
