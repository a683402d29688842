"""The shared wire: protocol, tensor frames, errors, ZeroMQ and CURVE helpers."""
