"""Generated from proto/vitrine/v1/*.proto by `make proto`; do not edit."""
