"""Training: the one loop shared by teacher and student, losses, distributed helpers, metrics and the
RIDE router's training."""
