"""The shared runtime: processes, logs, flags, devices, settings."""
