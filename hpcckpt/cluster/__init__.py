"""What hpcckpt does for a Slurm cluster: the Prolog/Epilog hooks, drain and migrate, resubmission."""
