"""The host's client of a running sandbox: everything that talks to its agent.

`commands` says what a request and a result are; `channel` carries requests to the agent
(and `direct` by one `docker exec` each when there is none); `connection` owns the runner,
the working folder and the audit record; `sessions`, `processes` and `files` are built
on a `Connection`, never on a `Sandbox`. Nothing here creates, starts or removes a
container: that is the lifecycle's job (`runtime.sandbox`).
"""
