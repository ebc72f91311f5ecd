"""FLARE adapters loaded by the FLARE server process."""
