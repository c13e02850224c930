"""Operations on this machine: the Docker Engine daemon, compose, cleanup, workspace
ownership, diagnostics and the dev-full workflow."""
