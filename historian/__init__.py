"""Time-series sinks (InfluxDB), the durable spool in front of them, and the SQL records.

Arrives with the historian issue; the PLC already publishes the snapshots and events it will
consume (``plc.channel.SnapshotChannel``).
"""
