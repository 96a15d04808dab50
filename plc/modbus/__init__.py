"""Field I/O over Modbus: the register map, the wire format, and the master's links.

Layers (bytes in, values out; only ``link`` and ``io`` touch sockets, serial ports or time)::

    pdu.py      Modbus PDUs, RTU framing (CRC-16, frame gap) and TCP framing (MBAP); pure
    codec.py    the register codec: a point's value <-> its bits or registers (types, word
                orders, scale / offset, packed bits), per point and per request block; pure,
                no pydantic
    regmap.py   the register map: config models (pydantic), validation against the I/O
                contract (plc.contract), request planning; pure
    legacy.py   import of the legacy Mapping.csv into a register-map file; pure
    link.py     one asyncio task per link (TCP endpoint or serial port): polls, writes,
                retries, reconnects, demotes silent devices, keeps diagnostics
    io.py       ModbusPlantIo: the runtime's PlantIo over latest-value slots; the scan
                never awaits the network
"""
