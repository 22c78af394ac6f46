"""The checkpoint/restart core: the Site, checkpoint, resume, the pipeline and the runner."""
