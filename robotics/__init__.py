"""Preference learning for robot policies and reward models in simulation."""
