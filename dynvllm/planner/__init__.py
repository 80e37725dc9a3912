"""The SLA planner: observe the service's load, predict the next interval, and choose how many
workers of each role meet the latency targets (see docs/planner.md).

Pure modules (`observe`, `predictors`, `profile`, `decide`) hold the logic; `service` and the
connectors do the I/O.
"""
