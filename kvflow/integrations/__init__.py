"""Integrations of kvflow's client SDK with agent frameworks (optional extras)."""
