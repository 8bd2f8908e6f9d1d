"""Plain logic behind the Serve deployments: no Ray imports here, so every piece is unit-tested alone."""
