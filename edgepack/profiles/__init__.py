"""Device database, measurement, energy and budgets (issue #7)."""
