"""Device database, measurement, energy and budgets."""
