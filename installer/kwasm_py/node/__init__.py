"""The node engine.

Pure: ``plan`` (install) and ``uninstall_plan``, ``layout`` (detection rules), ``state``.
Effects: ``hostfs`` (the one atomic write), ``procfs`` (the one /proc reader), ``restart`` and
``cri`` (each a Protocol port beside its real implementation). ``probe`` reads the node through
them; ``engine`` orchestrates install, uninstall and status, taking the ports as arguments.
"""
