"""Monitor: rerun SpRAy on served traffic and raise Prometheus metrics when a new Clever-Hans strategy appears."""
