"""The OPC UA server of the plant window: model, publisher, gate, security, records."""
