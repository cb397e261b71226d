"""The Plinth server: engine, model manager, jobs, gRPC services and the `plinth` command."""
