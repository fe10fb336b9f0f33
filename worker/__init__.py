"""Workers: the Celery app and tasks, and the embedded loop that uses the job table as its queue."""
