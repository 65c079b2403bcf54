DROP TABLE IF EXISTS hetzner_rate_budgets;
