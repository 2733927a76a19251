"""matrixopt."""
