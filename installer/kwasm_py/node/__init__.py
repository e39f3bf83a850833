"""The node engine.

Pure: ``plan``, ``layout`` (detection rules), ``state``. Effects: ``hostfs``, ``restart``, ``cri``.
``probe`` reads the node through them; ``engine`` orchestrates install, uninstall and status.
"""
