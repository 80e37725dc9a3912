"""The distributed runtime: NATS connection, discovery, streaming calls and events."""
