"""Training: one loop for every stage; stages differ by their objective."""
