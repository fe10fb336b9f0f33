"""HTTP job service over the subclone engine: FastAPI app, job store and embedded worker."""
