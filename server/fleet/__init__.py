"""A fleet on one machine from existing parts: PostgreSQL, loraserve replicas and HAProxy on loopback.

For `make fleet`, the fleet tests and the fleet benchmark; production deployments use deploy/.
"""
