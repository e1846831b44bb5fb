"""Training jobs: the job manager on the server side, the trainer process that runs one."""
