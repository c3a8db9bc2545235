"""MQTT: topic schema, payloads, the outbox publisher and the embedded broker."""
