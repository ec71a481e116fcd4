"""Cluster topologies for the simulator: device specs, preset builders, JSON (de)serialisation.

The public entry points are re-exported by :mod:`moesim.topology`; import them from there.
"""
