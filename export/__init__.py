"""From events to a versioned, verified model in the Triton repository (installed as `vitrine.export`)."""
