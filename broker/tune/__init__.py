"""The batching tuner (``python -m broker.tune``): TF Serving's batching parameters and
tfbroker's own flags swept for a user's model on this host (broker/tune/__main__.py)."""
