"""The process that stays with a job: it starts or restores it, checkpoints it, and reports its end."""
