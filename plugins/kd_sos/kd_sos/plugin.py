"""Hook implementations of the kd-sos plugin."""
