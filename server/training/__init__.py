"""Training jobs: the job store (local journal or Redis), the API side, the trainer pool and the trainer process."""
