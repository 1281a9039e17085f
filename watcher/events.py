"""Every event name the daemon logs: the stable `event` field that operators' alerts and
scripts match on. `event(log, name, ...)` is called with these names only (a test reads the
source to make sure), and docs/logging.md describes each (a test compares both ways)."""

from __future__ import annotations

EVENTS = (
    # the lifecycle
    "started",
    "ready",
    "stopping",
    "stopped",
    "reloaded",
    "reload_failed",
    "config_error",
    "insecure_secret",
    "drop_dir_resolved",
    "crashed",
    "stuck",
    # one daemon per drop folder
    "standby",
    "takeover",
    "lock_deferred",
    "lock_restored",
    "lock_lost",
    "lock_planted",
    "canary_planted",
    # a file's way
    "queued",
    "uploaded",
    "failed",
    "skipped",
    "vanished",
    "changed",
    "not_uploaded",
    "retrying",
    "recovered",
    "folder_not_writable",
    "folder_writable",
    # slow producers: ready markers and late writes
    "waiting_for_marker",
    "marker_kept",
    "late_write",
    "late_write_given_up",
    "late_write_abandoned",
    "late_write_window_full",
    # the watch
    "rescan",
    "scan_failed",
    "watch_error",
    "watch_failed",
    "watch_lost",
    "watch_restored",
    "watch_deaf",
    # the chores: receipts, status file, metrics, retention
    "receipt_failed",
    "sync_failed",
    "status",
    "metrics",
    "deleted",
    "retention_failed",
)
