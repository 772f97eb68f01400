"""Cost engine: the meter, reports and budgets, forecasts and the advisor (see `service`)."""
