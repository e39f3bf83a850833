"""The cluster side: the node agent, Kubernetes transports, the node view and the manifests."""
