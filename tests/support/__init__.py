"""Helpers shared by the tests (fake data, tiny trainers, hook recording)."""
