"""Declarative DR configuration and the pure decisions workflows may import. No I/O lives here."""
