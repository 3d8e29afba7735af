"""Ray Serve wiring only: app builders and the deployment classes that wrap the core packages."""
