"""Stages of a run; each composes data, models and losses."""
