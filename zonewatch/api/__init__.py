"""The gRPC API (package zonewatch.v1): alert stream, zones and stats, with bearer tokens.

The protocol lives in api/proto/zonewatch/v1/zonewatch.proto; `make setup` generates the
Python stubs into api/gen/ (not in git).
"""
