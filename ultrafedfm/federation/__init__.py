"""Federated rounds without FLARE: the job and its training contract, the site's round, the server's
run and its aggregation strategies (see ARCHITECTURE.md)."""
