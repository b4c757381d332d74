"""Ray Serve: the gateway replica and the app builders."""
