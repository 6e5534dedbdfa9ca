"""Simulated shoppers who react to what the gateway shows them (`vitrine simulate`)."""
