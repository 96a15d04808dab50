"""The soft-PLC: pure scan core (image, PID, sequencer, interlocks, alarms) and its runtime."""
