"""The states a run's ``status.json`` names, declared once for the worker that writes them and for every reader.

A worker is working while its status says an active state and writes a final one when it ends; a worker gone while
its status still says an active state was killed, and the readers (jobs, the multi-process launcher, the tab) report
it failed or cancelled.
"""

ACTIVE_STATES = ("starting", "generating_class_images", "caching", "running", "paused", "saving", "sampling")
FINAL_STATES = ("done", "failed", "cancelled")
STATES = ACTIVE_STATES + FINAL_STATES
