"""Ray Serve deployments of ray-maas: thin wrappers over the plain logic in `deployments.core` and `deployments.openai`."""
