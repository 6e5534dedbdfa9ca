"""Shared pytest set-up. Unit tests never start a service; integration tests are marked and use the real stack."""
