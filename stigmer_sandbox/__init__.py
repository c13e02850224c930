"""stigmer-sandbox: build, test and run local Docker sandboxes for Stigmer's agent runner.

The library works without Invoke; the Invoke tasks in `stigmer_sandbox.tasks`
are a thin layer over it.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The runtime (and the docker SDK behind it) loads only when used: `inv --list` stays fast.
    if name in ("Sandbox", "SandboxPool", "ExecResult", "LocalSandbox", "open_sandbox"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(name)


__all__ = ["ExecResult", "LocalSandbox", "Sandbox", "SandboxPool", "__version__", "open_sandbox"]
