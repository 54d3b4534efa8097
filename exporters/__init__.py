"""Sinks: where alerts, events and telemetry leave the agent (importable as zonewatch.exporters).

Every sink has the same small interface (exporters.base.Sink): export a batch, flush, shut down.
"""
