"""Exporters from a .baseq artifact to deployable formats."""
