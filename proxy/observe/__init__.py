"""What happened: the exchange record, metrics, the access log and log setup."""
