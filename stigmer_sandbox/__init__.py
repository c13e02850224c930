"""stigmer-sandbox: build, test and run local Docker sandboxes for Stigmer's agent runner.

The library works without Invoke; the Invoke tasks in `stigmer_sandbox.tasks`
are a thin layer over it.
"""

__version__ = "0.1.0"
