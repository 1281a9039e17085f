"""The daemon's lifecycle and chores: wiring, the main loop, systemd, the lock,
status, metrics, retention.
"""
