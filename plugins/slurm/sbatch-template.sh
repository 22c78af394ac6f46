#!/bin/bash
# hpcckpt batch job template. Copy, edit the #SBATCH lines and the command.
#
#SBATCH --job-name=myjob
#SBATCH --partition=low
#SBATCH --time=04:00:00
#SBATCH --ntasks=1
#SBATCH --output=%x-%j.out
#   come back after preemption, node failure or walltime:
#SBATCH --requeue
#SBATCH --open-mode=append
#   USR1 to the batch shell 300 s before the time limit: time for a final
#   checkpoint; hpcckpt then exits 85 and Slurm (RequeueExit=85) requeues the job.
#SBATCH --signal=B:USR1@300

# Set up the job's environment here (modules, variables), as usual.

# `exec` matters: --signal=B:... signals only the batch shell, so hpcckpt must
# BE the batch shell, not a child of it. On a requeue, the same line resumes
# from the latest image instead of starting over.
exec hpcckpt run --interval 30m -- ./simulate input.nml
