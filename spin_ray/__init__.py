"""spin-ray: SPIN (Self-Play fIne-tuNing) as one Ray job. A folder names the process that runs its modules."""
