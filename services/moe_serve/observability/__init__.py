"""What the services tell their operators: Prometheus metrics and scrape-time collectors, log lines."""
